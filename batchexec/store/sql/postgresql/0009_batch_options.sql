-- What a batch asks of every row (planning.BatchOptions, as JSON): the models it runs
-- side by side, its answer schema and the answer fields its outputs spread into columns.
-- NULL for a batch with none, as every batch before this version.

ALTER TABLE batches ADD COLUMN options TEXT;
