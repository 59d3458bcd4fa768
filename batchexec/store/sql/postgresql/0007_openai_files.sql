-- Files of the OpenAI Batch API (/v1/files), as in sql/sqlite/0007_openai_files.sql: the
-- content in chunks of up to 1 MiB, so every replica serves every file.

CREATE TABLE openai_files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    complete BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX openai_files_by_owner ON openai_files (owner, created_at, id);
CREATE INDEX openai_files_by_age ON openai_files (created_at);

CREATE TABLE openai_file_chunks (
    file_id TEXT NOT NULL REFERENCES openai_files (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (file_id, seq)
);
