-- boxoffice: one shard's schema, and sample data.
--
-- Every shard database holds this schema. The constraints make overselling
-- impossible even for a buggy client of the database: remaining stays between
-- 0 and capacity, a client reference names at most one booking in the shard,
-- and every row points at rows that exist.
--
-- Idempotent: safe to run again. Everything after the "sample data" marker is
-- sample data; `shard_service.schema` can install the schema without it.

CREATE TABLE IF NOT EXISTS events (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    venue       text NOT NULL CHECK (length(venue) BETWEEN 1 AND 200),
    starts_at   timestamptz NOT NULL,
    currency    char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    unlisted    boolean NOT NULL DEFAULT false  -- never in the public listing (drills, tests)
);
-- Databases created before the column: the same column, added (a no-op once there).
ALTER TABLE events ADD COLUMN IF NOT EXISTS unlisted boolean NOT NULL DEFAULT false;

CREATE TABLE IF NOT EXISTS ticket_tiers (
    id           uuid PRIMARY KEY,
    event_id     uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    price_cents  integer NOT NULL CHECK (price_cents >= 0),
    capacity     integer NOT NULL CHECK (capacity >= 0),
    remaining    integer NOT NULL,
    CONSTRAINT ticket_tiers_remaining_within_capacity CHECK (remaining BETWEEN 0 AND capacity),
    CONSTRAINT ticket_tiers_event_name_key UNIQUE (event_id, name)
);
CREATE INDEX IF NOT EXISTS ticket_tiers_event_id_idx ON ticket_tiers (event_id);

CREATE TABLE IF NOT EXISTS bookings (
    id                uuid PRIMARY KEY,
    event_id          uuid NOT NULL REFERENCES events (id),
    client_reference  text CHECK (length(client_reference) BETWEEN 1 AND 200),
    status            text NOT NULL DEFAULT 'confirmed' CHECK (status IN ('confirmed', 'cancelled')),
    total_cents       bigint NOT NULL CHECK (total_cents >= 0),
    currency          char(3) NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    cancelled_at      timestamptz,
    CONSTRAINT bookings_event_client_reference_key UNIQUE (event_id, client_reference),
    CONSTRAINT bookings_cancelled_at_matches_status
        CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL))
);
-- A reference is unique within the shard that holds its event (MISSION.md §3):
-- the same reference reused for another event is a conflict, not a new booking.
CREATE UNIQUE INDEX IF NOT EXISTS bookings_client_reference_key ON bookings (client_reference);
-- The buyer's secret (MISSION.md §6), as its SHA-256: a booking is replayed, read in
-- full or cancelled only by a caller that sends the secret (sql/booking.sql). Never the
-- secret itself. NULL: a booking made before this column existed, or by an internal
-- caller that sent no secret; no gateway caller ever matches it (a gateway always sends
-- one). Added in place on a database made before it.
ALTER TABLE bookings ADD COLUMN IF NOT EXISTS secret_hash bytea
    CONSTRAINT bookings_secret_hash_is_sha256 CHECK (octet_length(secret_hash) = 32);
CREATE INDEX IF NOT EXISTS bookings_event_id_idx ON bookings (event_id);

CREATE TABLE IF NOT EXISTS booking_items (
    booking_id        uuid NOT NULL REFERENCES bookings (id) ON DELETE CASCADE,
    ticket_tier_id    uuid NOT NULL REFERENCES ticket_tiers (id),
    quantity          integer NOT NULL CHECK (quantity > 0),
    unit_price_cents  integer NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (booking_id, ticket_tier_id)
);
CREATE INDEX IF NOT EXISTS booking_items_ticket_tier_id_idx ON booking_items (ticket_tier_id);

-- The shard's epoch, as the database itself knows it: one row, written first by every
-- promotion (node_agent.epoch.write_epoch), never lowered. The booking and cancel
-- procedures (shard_service/sql/booking.sql) take the caller's epoch and refuse a
-- mismatch or a missing row (`fenced`). The same DDL as node_agent/sql/epoch.sql, which
-- the node agent runs when the table is missing; `shard_service.schema.install`
-- inserts the first row (epoch 1 unless told otherwise).
CREATE TABLE IF NOT EXISTS boxoffice_epoch (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),  -- at most one row
    epoch        bigint NOT NULL CHECK (epoch >= 0),
    primary_name text,                                          -- the copy that wrote it
    since_lsn    pg_lsn,                                        -- WAL position the epoch began at
    updated_at   timestamptz
);

-- The newest sequencer seen per lease (common/sequencer.py): a step of a move (and any
-- write that carries a lease's sequencer) is refused when its sequencer is older than
-- the one stored for its lock, checked and raised by boxoffice_check_sequencer
-- (sql/moves.sql) inside the step's own procedure, in its transaction. Data like any
-- other: it replicates, so a failover keeps it.
CREATE TABLE IF NOT EXISTS boxoffice_lease_sequencers (
    lock_name   text PRIMARY KEY,
    sequencer   bigint NOT NULL CHECK (sequencer > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- == sample data ==
INSERT INTO events (id, name, venue, starts_at, currency) VALUES
    ('6f1c2a4e-8b1d-4c3e-9a57-0d1e2f3a4b01', 'Aurora Skies World Tour', 'Madison Square Garden, New York', '2027-03-14 20:00:00+00', 'USD'),
    ('a2d94b7c-5e3f-4a81-b6c2-7e8f9a0b1c02', 'The Midnight Ramblers', 'O2 Arena, London', '2027-04-02 19:30:00+00', 'USD'),
    ('c7e81f2a-9d4b-4e6c-8a13-5b2c3d4e5f03', 'Neon Tides Live', 'Jawaharlal Nehru Stadium, Delhi', '2027-05-21 18:00:00+00', 'USD'),
    ('1b5a7c9e-3d2f-4b8a-a6c4-9e0f1a2b3c04', 'Symphony of the Stars', 'Hollywood Bowl, Los Angeles', '2027-06-09 19:00:00+00', 'USD'),
    ('e4f6a8b0-2c1d-4e3f-9b5a-7c8d9e0f1a05', 'Bassline Festival', 'Tempodrom, Berlin', '2027-07-18 21:00:00+00', 'USD'),
    ('9d8c7b6a-5f4e-4d3c-b2a1-0f9e8d7c6b06', 'Lotus Jazz Nights', 'Esplanade, Singapore', '2027-08-27 20:00:00+00', 'USD')
ON CONFLICT (id) DO NOTHING;

INSERT INTO ticket_tiers (id, event_id, name, price_cents, capacity, remaining)
SELECT t.id::uuid, t.event_id::uuid, t.name, t.price_cents, t.capacity, t.capacity
FROM (VALUES
    ('0a1b2c3d-0001-4000-8000-000000000101', '6f1c2a4e-8b1d-4c3e-9a57-0d1e2f3a4b01', 'VIP',        45000,   50),
    ('0a1b2c3d-0001-4000-8000-000000000102', '6f1c2a4e-8b1d-4c3e-9a57-0d1e2f3a4b01', 'Front Row',  25000,  200),
    ('0a1b2c3d-0001-4000-8000-000000000103', '6f1c2a4e-8b1d-4c3e-9a57-0d1e2f3a4b01', 'GA',          8900, 5000),
    ('0a1b2c3d-0002-4000-8000-000000000201', 'a2d94b7c-5e3f-4a81-b6c2-7e8f9a0b1c02', 'VIP',        39000,   40),
    ('0a1b2c3d-0002-4000-8000-000000000202', 'a2d94b7c-5e3f-4a81-b6c2-7e8f9a0b1c02', 'Front Row',  19900,  150),
    ('0a1b2c3d-0002-4000-8000-000000000203', 'a2d94b7c-5e3f-4a81-b6c2-7e8f9a0b1c02', 'GA',          7500, 4000),
    ('0a1b2c3d-0003-4000-8000-000000000301', 'c7e81f2a-9d4b-4e6c-8a13-5b2c3d4e5f03', 'VIP',        30000,   60),
    ('0a1b2c3d-0003-4000-8000-000000000302', 'c7e81f2a-9d4b-4e6c-8a13-5b2c3d4e5f03', 'Front Row',  15000,  250),
    ('0a1b2c3d-0003-4000-8000-000000000303', 'c7e81f2a-9d4b-4e6c-8a13-5b2c3d4e5f03', 'GA',          4500, 8000),
    ('0a1b2c3d-0004-4000-8000-000000000401', '1b5a7c9e-3d2f-4b8a-a6c4-9e0f1a2b3c04', 'VIP',        52000,   30),
    ('0a1b2c3d-0004-4000-8000-000000000402', '1b5a7c9e-3d2f-4b8a-a6c4-9e0f1a2b3c04', 'Front Row',  27500,  120),
    ('0a1b2c3d-0004-4000-8000-000000000403', '1b5a7c9e-3d2f-4b8a-a6c4-9e0f1a2b3c04', 'GA',          9900, 3000),
    ('0a1b2c3d-0005-4000-8000-000000000501', 'e4f6a8b0-2c1d-4e3f-9b5a-7c8d9e0f1a05', 'VIP',        28000,   80),
    ('0a1b2c3d-0005-4000-8000-000000000502', 'e4f6a8b0-2c1d-4e3f-9b5a-7c8d9e0f1a05', 'Front Row',  14000,  300),
    ('0a1b2c3d-0005-4000-8000-000000000503', 'e4f6a8b0-2c1d-4e3f-9b5a-7c8d9e0f1a05', 'GA',          6900, 6000),
    ('0a1b2c3d-0006-4000-8000-000000000601', '9d8c7b6a-5f4e-4d3c-b2a1-0f9e8d7c6b06', 'VIP',        33000,   45),
    ('0a1b2c3d-0006-4000-8000-000000000602', '9d8c7b6a-5f4e-4d3c-b2a1-0f9e8d7c6b06', 'Front Row',  17500,  180),
    ('0a1b2c3d-0006-4000-8000-000000000603', '9d8c7b6a-5f4e-4d3c-b2a1-0f9e8d7c6b06', 'GA',          5500, 3500)
) AS t (id, event_id, name, price_cents, capacity)
ON CONFLICT (id) DO NOTHING;
