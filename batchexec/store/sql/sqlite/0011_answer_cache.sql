-- The answer cache: an answer kept for a request (a digest of its provider, model,
-- parameters and messages as sent: execution.cache_key) and one owner, so that the same
-- request from the same key is answered again without a call, until expires_at.
-- executions.cached marks a row answered so.

CREATE TABLE answer_cache (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    result TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    expires_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX answer_cache_by_expiry ON answer_cache (expires_at);

ALTER TABLE executions ADD COLUMN cached INTEGER;
