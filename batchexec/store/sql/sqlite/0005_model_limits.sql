-- Per-model limits shared by replicas: slots of calls in flight and the next start of a
-- paced model (see sql/postgresql/0005_model_limits.sql). A SQLite store serves one
-- process, whose limits stay in memory, and never reads them; they are here so that
-- every dialect has the same schema at the same version.

CREATE TABLE model_slots (
    model TEXT NOT NULL,
    slot INTEGER NOT NULL,
    holder TEXT,
    claim TEXT,
    held_until REAL NOT NULL,
    PRIMARY KEY (model, slot)
) WITHOUT ROWID;

CREATE TABLE model_pacing (
    model TEXT PRIMARY KEY,
    next_at REAL NOT NULL
) WITHOUT ROWID;
