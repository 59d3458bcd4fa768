-- A batch's rows as documents (store/sqlite_documents.py): its input in parts of 1,000
-- rows, and each group commit's starts and ends of its rows appended as one entry.
-- Row by row, a batch cost an INSERT a row when it was made and an UPDATE a row when
-- each ended. Batches written before keep their rows in executions, and their
-- entries apply over those.

CREATE TABLE row_inputs (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    part INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    outcomes TEXT NOT NULL,
    PRIMARY KEY (batch_id, part)
);

CREATE TABLE row_changes (
    id INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    changes TEXT NOT NULL
);

CREATE INDEX row_changes_by_batch ON row_changes (batch_id, id);
