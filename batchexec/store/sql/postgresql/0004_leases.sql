-- Leases: which replica runs an unfinished batch, until when (epoch seconds on the
-- database's clock, extract(epoch from clock_timestamp())), and a cancel asked of it
-- by another replica. A lease is free when lease_until is NULL or past; lease_owner
-- is who may write the batch's changes (see postgres.py).

ALTER TABLE batches ADD COLUMN lease_owner TEXT;
ALTER TABLE batches ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE batches ADD COLUMN cancel_reason TEXT;
