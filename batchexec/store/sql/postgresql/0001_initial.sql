-- The first schema: batches, their rows, the workbooks' owners, and the store's secret.
-- The schema's version is kept in schema_migrations, which the store makes itself.
--
-- Free text (messages, models, prompts, results, errors) is TEXT holding any Python
-- str: text PostgreSQL cannot hold (a NUL, a lone surrogate) is stored escaped, as
-- postgres_rows.text says. JSON is TEXT, not JSONB: JSONB refuses \u0000 and does
-- not keep the order of an object's keys, and the cells' order is the input's.

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    -- The order batches were stored in: ties of created_at are broken by it.
    created_order BIGINT GENERATED ALWAYS AS IDENTITY,
    owner TEXT NOT NULL,
    columns TEXT NOT NULL,            -- JSON list of the input columns
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    xlsx_name TEXT,
    retry_of TEXT
);
CREATE INDEX batches_by_owner ON batches (owner, created_at, created_order);
CREATE INDEX batches_unfinished ON batches (created_at, created_order)
    WHERE status IN ('queued', 'processing');
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
    latency_ms BIGINT,
    attempts BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    PRIMARY KEY (batch_id, idx)
);

CREATE TABLE files (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    written_at DOUBLE PRECISION NOT NULL,
    batch_id TEXT NOT NULL,
    template BOOLEAN NOT NULL
);
CREATE INDEX files_by_owner ON files (owner) WHERE template;
CREATE INDEX files_by_age ON files (written_at);
