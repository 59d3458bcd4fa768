-- Tokens per minute across replicas are PostgreSQL's alone (one process serves a SQLite
-- file, and keeps its account in memory: token_limits.py). Nothing changes here; the
-- version keeps both dialects numbered alike.
SELECT 1;
