-- What an execution's calls cost (records.Outcome.cost), in the catalog's currency:
-- its reported tokens priced by its model's input_per_mtok and output_per_mtok when
-- it ended. NULL where either was missing, as for every row before this version.

ALTER TABLE executions ADD COLUMN cost REAL;
