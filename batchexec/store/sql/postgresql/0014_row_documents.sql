-- A SQLite batch's rows became documents (0014 there). PostgreSQL keeps a row a
-- row: replicas read and claim them one by one. Nothing changes here; the version
-- keeps both dialects numbered alike.
SELECT 1;
