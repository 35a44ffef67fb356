-- The shard's epoch, as the database itself knows it: one row, written first by every
-- promotion (node_agent.epoch.write_epoch), never lowered. The booking and cancel
-- procedures compare it with the caller's epoch and refuse a mismatch (`fenced`).
-- Idempotent: safe to run on every start.
CREATE TABLE IF NOT EXISTS boxoffice_epoch (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),  -- at most one row
    epoch        bigint NOT NULL CHECK (epoch >= 0),
    primary_name text,                                          -- the copy that wrote it
    since_lsn    pg_lsn,                                        -- WAL position the epoch began at
    updated_at   timestamptz
);
