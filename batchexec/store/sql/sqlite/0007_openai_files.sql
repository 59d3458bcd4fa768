-- Files of the OpenAI Batch API (/v1/files): batch input files uploaded by a key, and the
-- output and error files of its batches. The content is kept here, in chunks of up to
-- 1 MiB in file order, so that any process on the database serves any file and an
-- upload is never held whole in memory. A file is listed and read once complete; an
-- upload cut off leaves an incomplete file that the sweeper removes by its age.

CREATE TABLE openai_files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX openai_files_by_owner ON openai_files (owner, created_at, id);
CREATE INDEX openai_files_by_age ON openai_files (created_at);

CREATE TABLE openai_file_chunks (
    file_id TEXT NOT NULL REFERENCES openai_files (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (file_id, seq)
) WITHOUT ROWID;
