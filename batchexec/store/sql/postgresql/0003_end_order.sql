-- The order in which a batch's rows ended (1, 2, ...; 0 while a row has not), so the
-- results route's `since` cursor holds across restarts. Rows that ended before this
-- version are numbered by their row number.

ALTER TABLE executions ADD COLUMN ended_seq BIGINT NOT NULL DEFAULT 0;
UPDATE executions SET ended_seq = idx WHERE status NOT IN ('pending', 'running');
