-- Per-model limits that hold across every replica (batchexec/shared_limits.py).
-- Times are epoch seconds on the database's clock.

-- Calls in flight: a model limited to N calls has slots 0 .. N-1, each free once
-- its held_until has passed (a released slot is set to 0). A call claims a free
-- slot and frees it when done; one whose holder died frees itself at held_until.
CREATE TABLE model_slots (
    model TEXT NOT NULL,
    slot INTEGER NOT NULL,
    holder TEXT,                      -- the replica holding it, for whoever reads the table
    claim UUID,                       -- which hold it is: a release frees only its own
    held_until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (model, slot)
);

-- Requests per minute: when the next request to a model may start.
CREATE TABLE model_pacing (
    model TEXT PRIMARY KEY,
    next_at DOUBLE PRECISION NOT NULL
);
