-- Tokens per minute across replicas (shared_tokens.py): a row a model's reservation, its
-- tokens, and when it stops counting: a window after its call ended (expires_at), or,
-- while in flight, held_until, past which the reservation of a holder that died lapses.

CREATE TABLE model_tokens (
    id BIGSERIAL PRIMARY KEY,
    model TEXT NOT NULL,
    tokens BIGINT NOT NULL,
    expires_at DOUBLE PRECISION,
    held_until DOUBLE PRECISION NOT NULL
);
CREATE INDEX model_tokens_by_model ON model_tokens (model);
