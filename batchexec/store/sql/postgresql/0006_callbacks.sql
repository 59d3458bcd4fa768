-- Completion webhooks (webhooks.py): where a batch's end is POSTed, and the delivery's
-- state. callback_state is NULL for a batch with no webhook, else 'pending' until it is
-- 'delivered' or 'failed' (given up). callback_next is when the next attempt is due, in
-- epoch seconds on the database's clock: a claim moves it on by the attempt's hold, so
-- one replica makes each attempt, and a replica that dies in one leaves it due again.

ALTER TABLE batches ADD COLUMN callback_url TEXT;
ALTER TABLE batches ADD COLUMN callback_state TEXT;
ALTER TABLE batches ADD COLUMN callback_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN callback_next DOUBLE PRECISION;

CREATE INDEX batches_callbacks_due ON batches (callback_next)
    WHERE callback_state = 'pending';
