-- Completion webhooks (webhooks.py): where a batch's end is POSTed, and the delivery's
-- state, as in sql/postgresql/0006_callbacks.sql. callback_next is in epoch seconds on
-- this process's clock.

ALTER TABLE batches ADD COLUMN callback_url TEXT;
ALTER TABLE batches ADD COLUMN callback_state TEXT;
ALTER TABLE batches ADD COLUMN callback_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN callback_next REAL;

CREATE INDEX batches_callbacks_due ON batches (callback_next)
    WHERE callback_state = 'pending';
