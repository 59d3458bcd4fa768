-- The first schema: batches, their rows, the workbooks' owners, and the store's secret.

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    columns TEXT NOT NULL,            -- JSON list of the input columns
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    xlsx_name TEXT,
    retry_of TEXT
);
CREATE INDEX batches_by_owner ON batches (owner, created_at);
CREATE INDEX batches_unfinished ON batches (created_at) WHERE status IN ('queued', 'processing');
CREATE INDEX batches_finished ON batches (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE executions (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    model TEXT NOT NULL,
    cells TEXT NOT NULL,              -- JSON object of the input cells
    status TEXT NOT NULL,
    prompt_sent TEXT,
    result TEXT,
    error TEXT,
    latency_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    PRIMARY KEY (batch_id, idx)
) WITHOUT ROWID;

CREATE TABLE files (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    written_at REAL NOT NULL,
    batch_id TEXT NOT NULL,
    template INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX files_by_owner ON files (owner) WHERE template;
CREATE INDEX files_by_age ON files (written_at);
