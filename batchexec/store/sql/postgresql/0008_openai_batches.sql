-- Batches of the OpenAI Batch API (/v1/batches). A batch whose input file was valid runs
-- as the batchexec batch of the same id (batches.api is 'openai' for it, so that a restart
-- plans its rows again as requests rather than as prompts); one whose lines were not is
-- only recorded here, failed, with its errors. Once its batchexec batch has ended, one
-- process writes its output and error files (a claim until finalize_until) and records
-- them: until then the batch is 'finalizing'. One still running when expires_at passes is
-- marked expired_at and cancelled.

ALTER TABLE batches ADD COLUMN api TEXT;

CREATE TABLE openai_batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    request_total INTEGER NOT NULL DEFAULT 0,
    errors TEXT,
    failed_at DOUBLE PRECISION,
    cancelling_at DOUBLE PRECISION,
    output_file_id TEXT,
    error_file_id TEXT,
    finalized_at DOUBLE PRECISION,
    -- When its completion window was found passed while it ran: it is then cancelled.
    expired_at DOUBLE PRECISION,
    finalize_until DOUBLE PRECISION
);
CREATE INDEX openai_batches_by_owner ON openai_batches (owner, created_at, id);
CREATE INDEX openai_batches_to_finalize ON openai_batches (id)
    WHERE finalized_at IS NULL AND failed_at IS NULL;
