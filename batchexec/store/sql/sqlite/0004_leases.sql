-- Leases: which replica runs an unfinished batch, until when (epoch seconds on the
-- database's clock), and a cancel asked of it by another replica. A SQLite store
-- serves one process and never reads them; they are here so that every dialect
-- has the same schema at the same version.

ALTER TABLE batches ADD COLUMN lease_owner TEXT;
ALTER TABLE batches ADD COLUMN lease_until REAL;
ALTER TABLE batches ADD COLUMN cancel_reason TEXT;
