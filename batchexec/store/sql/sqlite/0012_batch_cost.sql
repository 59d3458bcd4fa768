-- What a finished batch's rows cost (the sum of executions.cost), written with its end
-- beside its counts, so that the list route shows it without reading the rows. NULL
-- when no row has a cost, as for every batch before this version.

ALTER TABLE batches ADD COLUMN cost REAL;
