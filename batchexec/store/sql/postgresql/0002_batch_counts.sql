-- A finished batch's rows per status (JSON), written with its end, so listing it needs
-- no count over its rows. NULL for a batch not yet finished (counted from its rows).

ALTER TABLE batches ADD COLUMN counts TEXT;
