"""Every SQL statement the booking service sends, as named constants.

Bookings (one or a batch), cancels, event creation and move steps are single CALLs of the procedures in
sql/: one round trip each, answering (outcome, body, commit_lsn).
They commit inside, so they must never be sent inside a transaction block.
asyncpg prepares and caches each statement per connection. Every write carries the epoch the caller
believes the shard is at; the database refuses a mismatch (outcome `fenced`).
"""

# A booking: id, event, reference, tiers, quantities, the SHA-256 of the buyer's secret
# (NULL: none; common.api.secret_hash), the epoch.
BOOK = """
CALL boxoffice_book_committed($1::uuid, $2::uuid, $3::text, $4::uuid[], $5::int4[], $6::bytea, $7::int8)
"""

# A batch of bookings in one round trip and one commit (shard_service/combiner.py):
# parallel arrays, one element per request (booking id, event, reference, the buyer's
# secret hash, budget in ms), the items flattened (1-based request index, tier,
# quantity), the epoch.
# Answers (outcomes[], bodies[], commit_lsn), the outcomes in request order.
BOOK_BATCH = """
CALL boxoffice_book_committed_batch($1::uuid[], $2::uuid[], $3::text[], $4::bytea[], $5::int4[],
                                    $6::int4[], $7::uuid[], $8::int4[], $9::int8)
"""

# A cancel: the booking, the SHA-256 of the buyer's secret (a booking with another hash
# is `not_found`, as one that is not here), the epoch.
CANCEL = "CALL boxoffice_cancel_committed($1::uuid, $2::bytea, $3::int8)"

# The first epoch row of a new shard database (a promotion raises it; never lowered).
INSERT_FIRST_EPOCH = """
INSERT INTO boxoffice_epoch (id, epoch, updated_at) VALUES (true, $1::int8, now())
ON CONFLICT (id) DO NOTHING
"""

# What a copy's role is derived from (shard_service.roles), in one round trip. The
# epoch is NULL when the row is missing; a missing table is an UndefinedTableError.
COPY_STATE = """
SELECT pg_is_in_recovery() AS in_recovery, (SELECT epoch FROM boxoffice_epoch) AS epoch
"""
IN_RECOVERY = "SELECT pg_is_in_recovery()"  # when the epoch table does not exist

# The position goes over as text: asyncpg would encode a pg_lsn parameter as int8.
WAIT_FOR_LSN = "SELECT boxoffice_wait_for_lsn($1::text::pg_lsn, $2::int4)"

# A booking's full view, for its buyer (the SHA-256 of its secret, $2) or an operator
# ($3 true); no row otherwise, exactly as for an id that is not here.
GET_BOOKING = """
SELECT boxoffice_booking_json(b.id)::text FROM bookings b
WHERE b.id = $1::uuid AND ($3::bool OR boxoffice_owns(b.secret_hash, $2::bytea))
"""

# starts_at stays a timestamptz (microseconds): the service writes it in the one
# canonical form of common.cursor, which listing cursors carry at full precision.
EVENT_COLUMNS = """
    e.id::text AS id, e.name, e.venue, e.starts_at, e.currency, e.unlisted
"""

# The listing: unlisted events (drills, tests) only when $4 is true (an operator asked).
LIST_EVENTS = f"""
SELECT {EVENT_COLUMNS}
FROM events e
WHERE ($1::timestamptz IS NULL OR (e.starts_at, e.id) > ($1::timestamptz, $2::uuid))
  AND ($4::bool OR NOT e.unlisted)
ORDER BY e.starts_at, e.id
LIMIT $3
"""

GET_EVENT = f"SELECT {EVENT_COLUMNS} FROM events e WHERE e.id = $1::uuid"

LIST_TIERS = """
SELECT t.id::text AS id, t.event_id::text AS event_id, t.name, t.price_cents, e.currency,
       t.capacity, t.remaining
FROM ticket_tiers t JOIN events e ON e.id = t.event_id
WHERE t.event_id = $1::uuid
ORDER BY t.price_cents DESC, t.id
"""

EVENT_EXISTS = "SELECT EXISTS (SELECT 1 FROM events WHERE id = $1::uuid)"

SERVER_STATE = """
SELECT pg_is_in_recovery() AS in_recovery,
       CASE WHEN pg_is_in_recovery()
            THEN extract(epoch FROM (now() - pg_last_xact_replay_timestamp()))::float8
       END AS replay_lag_seconds,  -- float8: extract() gives numeric, which JSON cannot take
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text
           AS lsn
"""

# Operator: create an event with its tiers (sql/events.sql): one CALL answering
# (outcome, body, commit_lsn), fenced by the epoch ($11); a retry of the same creation
# is `existing`, answered after the synchronous standbys hold the event.
CREATE_EVENT = """
CALL boxoffice_create_event_committed($1::uuid, $2::text, $3::text, $4::timestamptz, $5::text,
                                      $6::bool, $7::uuid[], $8::text[], $9::int4[], $10::int4[],
                                      $11::int8)
"""

# Keep only the listed events (used once, when sample data is placed on shards).
DELETE_EVENTS_EXCEPT = "DELETE FROM events WHERE NOT (id = ANY ($1::uuid[]))"

EVENT_IDS = "SELECT id FROM events ORDER BY starts_at, id"

# -- event moves (sql/moves.sql; shard_service/moves.py) ------------------------------
# Reads, each one snapshot.
MOVE_WATERMARK = "SELECT boxoffice_move_watermark()"  # before MOVE_EXPORT, in its own statement
MOVE_EXPORT = "SELECT boxoffice_move_export($1::uuid, $2::text::timestamptz, $3::uuid, $4::int4)::text"
MOVE_KEYS = "SELECT boxoffice_move_keys($1::uuid)::text"
MOVE_COLLISIONS = "SELECT boxoffice_move_collisions($1::uuid, $2::uuid[], $3::text[])::text"
MOVE_DIGEST = "SELECT boxoffice_move_digest($1::uuid)::text"
MOVE_STATE = """
SELECT m.state, m.peer_shard, m.move_id, m.updated_at::text AS updated_at,
       EXISTS (SELECT 1 FROM events e WHERE e.id = $1::uuid) AS present
FROM (SELECT 1) one LEFT JOIN boxoffice_event_moves m ON m.event_id = $1::uuid
"""
# The tombstone a read that found nothing looks for (event id, or a booking id's prefix).
TOMBSTONE = "SELECT boxoffice_tombstone($1::uuid, $2::uuid)::text"
# Writes: CALLs answering (outcome, body, commit_lsn), fenced by the epoch and by the
# lease's sequencer (the last three arguments: epoch, lock, sequencer; no lock: no fence).
MOVE_IMPORT = ("CALL boxoffice_move_import_committed($1::text, $2::text, $3::text::jsonb, $4::int8, "
               "$5::text, $6::int8)")
MOVE_FREEZE = ("CALL boxoffice_move_freeze_committed($1::uuid, $2::text, $3::text, $4::int8, "
               "$5::text, $6::int8)")
MOVE_UNFREEZE = ("CALL boxoffice_move_unfreeze_committed($1::uuid, $2::text, $3::int8, $4::text, "
                 "$5::int8)")
MOVE_ACTIVATE = ("CALL boxoffice_move_activate_committed($1::uuid, $2::text, $3::int8, $4::text, "
                 "$5::int8)")
MOVE_RETIRE = ("CALL boxoffice_move_retire_committed($1::uuid, $2::text, $3::text, $4::int8, "
               "$5::text, $6::int8)")
MOVE_ABANDON = ("CALL boxoffice_move_abandon_committed($1::uuid, $2::text, $3::int8, $4::text, "
                "$5::int8)")
