-- boxoffice event moves: one event's rows go from a source shard to a target shard
-- while it is on sale (event_ops/move.py runs the steps; the booking service's
-- shard_service/moves.py calls these functions; docs/moves.md tells the whole story).
--
-- An event's write state on a shard is a row of boxoffice_event_moves, or no row:
--   (no row)   open: bookings and cancels go through as always;
--   importing  this shard is a move's target and is receiving the event's rows:
--              bookings and cancels are refused (`event_moving`, retryable);
--   frozen     this shard is a move's source and has stopped taking the event's
--              writes (`event_moving`, retryable) until the move flips or rolls back;
--   moved      a tombstone: the event left for `peer_shard`; its rows are gone here;
--              a booking, a cancel or a read that arrives here anyway (a gateway with a
--              stale map) is answered `event_moved`, naming the shard, so the gateway
--              re-routes instead of answering 404.
-- The booking and cancel functions (booking.sql) read the state AFTER they hold the
-- event's tier locks, and freezing takes those locks before it writes the state, in
-- one transaction: a booking in flight when the freeze starts commits first (the
-- freeze waits for its locks) and is in the final copy; a booking that queued behind
-- the freeze sees `frozen` (a new statement, READ COMMITTED: a snapshot taken after
-- the lock was granted) and writes nothing. Other events' tiers are never locked.
-- The row is data like any other: it replicates, so a failover of either shard keeps
-- the state the move left.
-- Every function that writes checks the caller's epoch first (boxoffice_check_epoch,
-- booking.sql), so a move's write through a demoted copy is refused like a booking's.

CREATE TABLE IF NOT EXISTS boxoffice_event_moves (
    event_id    uuid PRIMARY KEY,          -- no reference to events: a tombstone outlives its rows
    state       text NOT NULL CHECK (state IN ('importing', 'frozen', 'moved')),
    peer_shard  text NOT NULL,             -- the target (source side), the source (target side)
    move_id     text NOT NULL,             -- the move that wrote the state (its journal's id)
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The refusal of a write to `p_event_id` by its write state: NULL outcome when the
-- event is open here. Called by boxoffice_book_locked and boxoffice_cancel with the
-- event's tier locks held.
CREATE OR REPLACE FUNCTION boxoffice_event_write_refusal(
    p_event_id uuid, OUT outcome text, OUT body jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_state text;
    v_peer text;
BEGIN
    SELECT m.state, m.peer_shard INTO v_state, v_peer
      FROM boxoffice_event_moves m WHERE m.event_id = p_event_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    outcome := CASE v_state WHEN 'moved' THEN 'event_moved' ELSE 'event_moving' END;
    body := jsonb_build_object('eventId', p_event_id, 'state', v_state, 'shard', v_peer);
END
$$;

-- The tombstone of the event a request names, if the event left this shard: by event
-- id, or by the first 8 bytes a booking id shares with its event's id (common/ids.py).
-- NULL when there is none. Read-only; a read that found nothing asks it.
CREATE OR REPLACE FUNCTION boxoffice_tombstone(p_event_id uuid, p_booking_id uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('eventId', m.event_id, 'shard', m.peer_shard)
      FROM boxoffice_event_moves m
     WHERE m.state = 'moved'
       AND (m.event_id = p_event_id
            OR (p_booking_id IS NOT NULL
                AND substring(uuid_send(m.event_id) FROM 1 FOR 8)
                    = substring(uuid_send(p_booking_id) FROM 1 FOR 8)))
     LIMIT 1
$$;

-- The event's rows for a copy, read in ONE snapshot (a STABLE function sees the
-- snapshot of the statement that calls it): the event, every tier (a handful; their
-- `remaining` as of this snapshot), and the bookings (with their items) created or
-- cancelled at or after `p_since` whose id is above `p_after`, at most `p_limit`, in
-- id order (the next page starts after the last id). NULL `p_since`: every booking.
-- The next round starts at the watermark the caller read just before (boxoffice_move_watermark).
CREATE OR REPLACE FUNCTION boxoffice_move_export(
    p_event_id uuid, p_since timestamptz, p_after uuid, p_limit integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'event', (SELECT jsonb_build_object(
                      'id', e.id, 'name', e.name, 'venue', e.venue,
                      'startsAt', e.starts_at::text, 'currency', e.currency,
                      'createdAt', e.created_at::text, 'unlisted', e.unlisted)
                  FROM events e WHERE e.id = p_event_id),
        'tiers', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                      'id', t.id, 'name', t.name, 'priceCents', t.price_cents,
                      'capacity', t.capacity, 'remaining', t.remaining) ORDER BY t.id), '[]')
                  FROM ticket_tiers t WHERE t.event_id = p_event_id),
        'bookings', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                      'id', b.id, 'clientReference', b.client_reference, 'status', b.status,
                      'totalCents', b.total_cents, 'currency', b.currency,
                      'createdAt', b.created_at::text, 'cancelledAt', b.cancelled_at::text,
                      'secretHash', encode(b.secret_hash, 'hex'),  -- the buyer's (sql/seed.sql)
                      'items', (SELECT jsonb_agg(jsonb_build_object(
                                    'ticketTierId', i.ticket_tier_id, 'quantity', i.quantity,
                                    'unitPriceCents', i.unit_price_cents) ORDER BY i.ticket_tier_id)
                                FROM booking_items i WHERE i.booking_id = b.id))
                      ORDER BY b.id), '[]')
                     FROM (SELECT * FROM bookings b
                            WHERE b.event_id = p_event_id
                              AND (p_since IS NULL OR b.created_at >= p_since
                                   OR b.cancelled_at >= p_since)
                              AND (p_after IS NULL OR b.id > p_after)
                            ORDER BY b.id LIMIT p_limit) b),
        'state', (SELECT to_jsonb(m) FROM boxoffice_event_moves m WHERE m.event_id = p_event_id))
$$;

-- Where the next round of an export starts, read in its own statement BEFORE the export's
-- snapshot is taken: the start of the oldest transaction running now (or now). A row the
-- export will not see was written by a transaction that was running now (so it started
-- at or after the watermark) or that starts later; a booking's created_at and a cancel's
-- cancelled_at are their transaction's start time, so that row carries a time at or
-- after the watermark and the next round exports it. A backend publishes its start time
-- in pg_stat_activity as it takes it (StartTransaction); 10 ms of margin covers that
-- instant. The move's final check (boxoffice_move_digest on both sides, after the freeze)
-- does not rely on any of this.
CREATE OR REPLACE FUNCTION boxoffice_move_watermark()
RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT (least(clock_timestamp(), min(a.xact_start)) - interval '10 milliseconds')::text
      FROM pg_stat_activity a WHERE a.xact_start IS NOT NULL
$$;

-- What would collide on this shard (a move's target) with an event arriving with
-- these tier ids and client references: the event itself when it is here and open (a
-- move's earlier import, still `importing`, or a tombstone, is not a collision), tiers
-- of another event with one of the ids, bookings of another event with one of the
-- references. Read-only: the preflight of a move.
CREATE OR REPLACE FUNCTION boxoffice_move_collisions(
    p_event_id uuid, p_tier_ids uuid[], p_references text[])
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'event', EXISTS (SELECT 1 FROM events e WHERE e.id = p_event_id)
                 AND NOT EXISTS (SELECT 1 FROM boxoffice_event_moves m
                                  WHERE m.event_id = p_event_id AND m.state = 'importing'),
        'tierIds', (SELECT coalesce(jsonb_agg(t.id ORDER BY t.id), '[]')
                    FROM ticket_tiers t
                    WHERE t.id = ANY (p_tier_ids) AND t.event_id <> p_event_id),
        'clientReferences', (SELECT coalesce(jsonb_agg(b.client_reference ORDER BY b.client_reference), '[]')
                             FROM bookings b
                             WHERE b.client_reference = ANY (p_references)
                               AND b.event_id <> p_event_id))
$$;

-- Every tier id and client reference of the event on this shard (the source), for the
-- preflight's collision check on the target.
CREATE OR REPLACE FUNCTION boxoffice_move_keys(p_event_id uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'tierIds', (SELECT coalesce(jsonb_agg(t.id ORDER BY t.id), '[]')
                    FROM ticket_tiers t WHERE t.event_id = p_event_id),
        'clientReferences', (SELECT coalesce(jsonb_agg(b.client_reference ORDER BY b.client_reference), '[]')
                             FROM bookings b
                             WHERE b.event_id = p_event_id AND b.client_reference IS NOT NULL))
$$;

-- A timestamp as microseconds since the epoch: the same text whatever a session's TimeZone.
CREATE OR REPLACE FUNCTION boxoffice_micros(p_at timestamptz)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$ SELECT (extract(epoch FROM p_at) * 1000000)::bigint $$;

-- A digest of the event's rows, the same on both sides when the copy is complete:
-- per tier its capacity, remaining and tickets sold (confirmed bookings' items), and
-- the bookings (count, cancelled, and an md5 over every booking's id, reference,
-- status, total, buyer's secret hash and items, in id order). Read in one snapshot.
CREATE OR REPLACE FUNCTION boxoffice_move_digest(p_event_id uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'tiers', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                      'id', t.id, 'capacity', t.capacity, 'remaining', t.remaining,
                      'sold', (SELECT coalesce(sum(i.quantity), 0)
                               FROM booking_items i JOIN bookings b ON b.id = i.booking_id
                               WHERE i.ticket_tier_id = t.id AND b.status = 'confirmed'))
                      ORDER BY t.id), '[]')
                  FROM ticket_tiers t WHERE t.event_id = p_event_id),
        'bookings', (SELECT count(*) FROM bookings b WHERE b.event_id = p_event_id),
        'cancelled', (SELECT count(*) FROM bookings b
                      WHERE b.event_id = p_event_id AND b.status = 'cancelled'),
        'checksum', (SELECT md5(coalesce(string_agg(
                         b.id::text || '|' || coalesce(b.client_reference, '') || '|' || b.status
                         || '|' || b.total_cents || '|' || boxoffice_micros(b.created_at) || '|'
                         || coalesce(boxoffice_micros(b.cancelled_at)::text, '') || '|'
                         || coalesce(encode(b.secret_hash, 'hex'), '') || '|'
                         || (SELECT string_agg(i.ticket_tier_id::text || 'x' || i.quantity || '@'
                                               || i.unit_price_cents, ',' ORDER BY i.ticket_tier_id)
                             FROM booking_items i WHERE i.booking_id = b.id),
                         ';' ORDER BY b.id), ''))
                     FROM bookings b WHERE b.event_id = p_event_id))
$$;

-- The lease fence of a step (common/sequencer.py): NULL when the step may go on, else
-- the details of its refusal (`stale_sequencer`). A step without a lease (NULL lock) is
-- not fenced this way. The newest sequencer seen for the lock is raised to the step's
-- in the step's own transaction, and the row stays locked to its commit: a step of an
-- older acquisition that comes later, or waits behind it, is refused.
CREATE OR REPLACE FUNCTION boxoffice_check_sequencer(p_lock text, p_sequencer bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_newest bigint;
BEGIN
    IF p_lock IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO boxoffice_lease_sequencers AS s (lock_name, sequencer)
    VALUES (p_lock, p_sequencer)
    ON CONFLICT (lock_name) DO UPDATE SET sequencer = excluded.sequencer, updated_at = now()
     WHERE s.sequencer < excluded.sequencer;  -- the row is locked either way
    SELECT s.sequencer INTO v_newest FROM boxoffice_lease_sequencers s WHERE s.lock_name = p_lock;
    IF v_newest > p_sequencer THEN
        RETURN jsonb_build_object('lock', p_lock, 'sequencer', p_sequencer, 'newest', v_newest);
    END IF;
    RETURN NULL;
END
$$;

-- The write steps of a move. Each is a procedure: the epoch check, the lease fence
-- (boxoffice_check_sequencer), the change, COMMIT, and the WAL position the commit
-- reached (as the booking procedures do), answering (outcome, body, commit_lsn). Every
-- one is idempotent: run again after it succeeded, it answers the same outcome and
-- changes nothing. Every success calls boxoffice_sync_mark (sql/booking.sql) first, so
-- its COMMIT writes a commit record and waits for the synchronous standbys like any
-- write: a step that finds its work done (a retry) does not answer before the standbys
-- hold everything it answers about (an earlier attempt's commit that was only local).
--
-- The signatures before the lease fence existed are dropped, so that no caller can
-- step past the fence through an old overload.
DROP PROCEDURE IF EXISTS boxoffice_move_import_committed(text, text, jsonb, bigint, text, text, text);
DROP PROCEDURE IF EXISTS boxoffice_move_freeze_committed(uuid, text, text, bigint, text, text, text);
DROP PROCEDURE IF EXISTS boxoffice_move_unfreeze_committed(uuid, text, bigint, text, text, text);
DROP PROCEDURE IF EXISTS boxoffice_move_activate_committed(uuid, text, bigint, text, text, text);
DROP PROCEDURE IF EXISTS boxoffice_move_retire_committed(uuid, text, text, bigint, text, text, text);
DROP PROCEDURE IF EXISTS boxoffice_move_abandon_committed(uuid, text, bigint, text, text, text);

-- Target: upsert one exported page (boxoffice_move_export's document) by primary key,
-- verbatim (ids, references, timestamps, statuses, prices), and hold the event in
-- `importing` (a tombstone of an earlier move away from here is replaced). Refused
-- (`collision`, nothing written) when the event is here and open, or a tier id or a
-- client reference is another event's; `not_importing` when another move holds it.
CREATE OR REPLACE PROCEDURE boxoffice_move_import_committed(
    p_move_id text,
    p_source_shard text,
    p_doc jsonb,
    p_epoch bigint,
    p_lock text,
    p_sequencer bigint,
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced jsonb;
    v_event_id uuid := (p_doc -> 'event' ->> 'id')::uuid;
    v_state text;
    v_move text;
    v_tiers integer;
    v_bookings integer;
    v_constraint text;
BEGIN
    v_fenced := boxoffice_check_epoch(p_epoch);
    IF v_fenced IS NOT NULL THEN
        outcome := 'fenced'; body := v_fenced::text;
        RETURN;
    END IF;
    body := boxoffice_check_sequencer(p_lock, p_sequencer)::text;
    IF body IS NOT NULL THEN
        outcome := 'stale_sequencer';
        RETURN;
    END IF;
    SELECT m.state, m.move_id INTO v_state, v_move
      FROM boxoffice_event_moves m WHERE m.event_id = v_event_id FOR UPDATE;
    IF v_state = 'importing' AND v_move <> p_move_id OR v_state = 'frozen' THEN
        outcome := 'not_importing';
        body := jsonb_build_object('state', v_state, 'moveId', v_move)::text;
        RETURN;
    END IF;
    IF (v_state IS NULL OR v_state = 'moved')
       AND EXISTS (SELECT 1 FROM events e WHERE e.id = v_event_id) THEN
        outcome := 'collision'; body := jsonb_build_object('event', true)::text;
        RETURN;
    END IF;
    INSERT INTO boxoffice_event_moves (event_id, state, peer_shard, move_id)
    VALUES (v_event_id, 'importing', p_source_shard, p_move_id)
    ON CONFLICT (event_id) DO UPDATE
       SET state = 'importing', peer_shard = p_source_shard, move_id = p_move_id, updated_at = now();

    BEGIN
        INSERT INTO events (id, name, venue, starts_at, currency, created_at, unlisted)
        SELECT v_event_id, d ->> 'name', d ->> 'venue', (d ->> 'startsAt')::timestamptz,
               d ->> 'currency', (d ->> 'createdAt')::timestamptz,
               coalesce((d ->> 'unlisted')::boolean, false)
          FROM (SELECT p_doc -> 'event' AS d) x
        ON CONFLICT (id) DO NOTHING;

        INSERT INTO ticket_tiers AS t (id, event_id, name, price_cents, capacity, remaining)
        SELECT (x ->> 'id')::uuid, v_event_id, x ->> 'name', (x ->> 'priceCents')::integer,
               (x ->> 'capacity')::integer, (x ->> 'remaining')::integer
          FROM jsonb_array_elements(p_doc -> 'tiers') x
        ON CONFLICT (id) DO UPDATE SET remaining = excluded.remaining
         WHERE t.event_id = excluded.event_id;
        IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_doc -> 'tiers') x
                     JOIN ticket_tiers t ON t.id = (x ->> 'id')::uuid
                    WHERE t.event_id <> v_event_id) THEN
            RAISE unique_violation USING CONSTRAINT = 'ticket_tiers_pkey';
        END IF;
        v_tiers := jsonb_array_length(p_doc -> 'tiers');

        INSERT INTO bookings AS b (id, event_id, client_reference, status, total_cents, currency,
                                   created_at, cancelled_at, secret_hash)
        SELECT (x ->> 'id')::uuid, v_event_id, x ->> 'clientReference', x ->> 'status',
               (x ->> 'totalCents')::bigint, x ->> 'currency', (x ->> 'createdAt')::timestamptz,
               (x ->> 'cancelledAt')::timestamptz, decode(x ->> 'secretHash', 'hex')
          FROM jsonb_array_elements(p_doc -> 'bookings') x
        ON CONFLICT (id) DO UPDATE SET status = excluded.status, cancelled_at = excluded.cancelled_at
         WHERE b.event_id = excluded.event_id;
        v_bookings := jsonb_array_length(p_doc -> 'bookings');

        INSERT INTO booking_items (booking_id, ticket_tier_id, quantity, unit_price_cents)
        SELECT (x ->> 'id')::uuid, (i ->> 'ticketTierId')::uuid, (i ->> 'quantity')::integer,
               (i ->> 'unitPriceCents')::integer
          FROM jsonb_array_elements(p_doc -> 'bookings') x,
               jsonb_array_elements(x -> 'items') i
        ON CONFLICT DO NOTHING;
    EXCEPTION WHEN unique_violation THEN
        -- Another event's tier id or client reference: the block's subtransaction rolls
        -- back, and the state row goes with the ROLLBACK below (a transaction cannot end
        -- inside a block that has an exception handler).
        GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
        outcome := 'collision';
        body := jsonb_build_object('constraint', v_constraint)::text;
    END;
    IF outcome = 'collision' THEN
        ROLLBACK;
        RETURN;
    END IF;
    outcome := 'imported';
    body := jsonb_build_object('tiers', v_tiers, 'bookings', v_bookings)::text;
    PERFORM boxoffice_sync_mark();  -- a commit record, so a synchronous wait (see above)
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- Source: stop taking the event's writes. Takes the event's tier locks (id order, as a
-- booking does), so it waits for the bookings holding them, then writes `frozen`.
-- `not_here` when the event is not on this shard (or is a tombstone already).
CREATE OR REPLACE PROCEDURE boxoffice_move_freeze_committed(
    p_event_id uuid,
    p_move_id text,
    p_target_shard text,
    p_epoch bigint,
    p_lock text,
    p_sequencer bigint,
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced jsonb;
    v_state text;
    v_move text;
BEGIN
    v_fenced := boxoffice_check_epoch(p_epoch);
    IF v_fenced IS NOT NULL THEN
        outcome := 'fenced'; body := v_fenced::text;
        RETURN;
    END IF;
    body := boxoffice_check_sequencer(p_lock, p_sequencer)::text;
    IF body IS NOT NULL THEN
        outcome := 'stale_sequencer';
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM events e WHERE e.id = p_event_id) THEN
        outcome := 'not_here'; body := '{}';
        RETURN;
    END IF;
    PERFORM 1 FROM ticket_tiers t WHERE t.event_id = p_event_id ORDER BY t.id FOR UPDATE;
    SELECT m.state, m.move_id INTO v_state, v_move
      FROM boxoffice_event_moves m WHERE m.event_id = p_event_id FOR UPDATE;
    IF v_state IS NOT NULL AND NOT (v_state = 'frozen' AND v_move = p_move_id) THEN
        outcome := 'not_open';
        body := jsonb_build_object('state', v_state, 'moveId', v_move)::text;
        RETURN;
    END IF;
    INSERT INTO boxoffice_event_moves (event_id, state, peer_shard, move_id)
    VALUES (p_event_id, 'frozen', p_target_shard, p_move_id)
    ON CONFLICT (event_id) DO NOTHING;
    outcome := 'frozen';
    body := jsonb_build_object('frozenAt', (SELECT m.updated_at::text FROM boxoffice_event_moves m
                                            WHERE m.event_id = p_event_id))::text;
    PERFORM boxoffice_sync_mark();  -- a commit record, so a synchronous wait (see above)
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- Source, rolling a move back before its flip: open the event again (only a freeze of
-- this move is lifted; `not_ours` when another move's freeze holds it).
CREATE OR REPLACE PROCEDURE boxoffice_move_unfreeze_committed(
    p_event_id uuid,
    p_move_id text,
    p_epoch bigint,
    p_lock text,
    p_sequencer bigint,
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced jsonb;
BEGIN
    v_fenced := boxoffice_check_epoch(p_epoch);
    IF v_fenced IS NOT NULL THEN
        outcome := 'fenced'; body := v_fenced::text;
        RETURN;
    END IF;
    body := boxoffice_check_sequencer(p_lock, p_sequencer)::text;
    IF body IS NOT NULL THEN
        outcome := 'stale_sequencer';
        RETURN;
    END IF;
    DELETE FROM boxoffice_event_moves m
     WHERE m.event_id = p_event_id AND m.state = 'frozen' AND m.move_id = p_move_id;
    SELECT jsonb_build_object('state', m.state, 'moveId', m.move_id)::text INTO body
      FROM boxoffice_event_moves m WHERE m.event_id = p_event_id AND m.state = 'frozen';
    IF body IS NOT NULL THEN  -- frozen by another move: not open, whatever this one did
        outcome := 'not_ours';
        RETURN;
    END IF;
    outcome := 'open'; body := '{}';
    PERFORM boxoffice_sync_mark();  -- a commit record, so a synchronous wait (see above)
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- Target, after the flip: open the event (only an import of this move is activated).
-- `not_importing` when the event is not held by this move (nothing to activate: done
-- already if the event is here and open).
CREATE OR REPLACE PROCEDURE boxoffice_move_activate_committed(
    p_event_id uuid,
    p_move_id text,
    p_epoch bigint,
    p_lock text,
    p_sequencer bigint,
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced jsonb;
    v_deleted integer;
BEGIN
    v_fenced := boxoffice_check_epoch(p_epoch);
    IF v_fenced IS NOT NULL THEN
        outcome := 'fenced'; body := v_fenced::text;
        RETURN;
    END IF;
    body := boxoffice_check_sequencer(p_lock, p_sequencer)::text;
    IF body IS NOT NULL THEN
        outcome := 'stale_sequencer';
        RETURN;
    END IF;
    DELETE FROM boxoffice_event_moves m
     WHERE m.event_id = p_event_id AND m.state = 'importing' AND m.move_id = p_move_id;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    IF v_deleted = 0 AND NOT (EXISTS (SELECT 1 FROM events e WHERE e.id = p_event_id)
                             AND NOT EXISTS (SELECT 1 FROM boxoffice_event_moves m
                                              WHERE m.event_id = p_event_id)) THEN
        outcome := 'not_importing'; body := '{}';
        RETURN;
    END IF;
    outcome := 'open'; body := '{}';
    PERFORM boxoffice_sync_mark();  -- a commit record, so a synchronous wait (see above)
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- Every row of the event on this shard (its items, bookings, tiers and the event), for
-- a source that retires it or a target that abandons an import; the event's tier locks
-- are taken first, as every write takes them. How many bookings went.
CREATE OR REPLACE FUNCTION boxoffice_move_delete_rows(p_event_id uuid)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_bookings integer;
BEGIN
    PERFORM 1 FROM ticket_tiers t WHERE t.event_id = p_event_id ORDER BY t.id FOR UPDATE;
    DELETE FROM booking_items i USING bookings b
     WHERE b.event_id = p_event_id AND i.booking_id = b.id;
    DELETE FROM bookings b WHERE b.event_id = p_event_id;
    GET DIAGNOSTICS v_bookings = ROW_COUNT;
    DELETE FROM events e WHERE e.id = p_event_id;  -- its tiers go with it (ON DELETE CASCADE)
    RETURN v_bookings;
END
$$;

-- Source, after the flip: delete the event's rows and leave the tombstone (`moved`,
-- naming the target). Only from this move's freeze (or its tombstone: done already).
CREATE OR REPLACE PROCEDURE boxoffice_move_retire_committed(
    p_event_id uuid,
    p_move_id text,
    p_target_shard text,
    p_epoch bigint,
    p_lock text,
    p_sequencer bigint,
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced jsonb;
    v_state text;
    v_move text;
    v_bookings integer;
BEGIN
    v_fenced := boxoffice_check_epoch(p_epoch);
    IF v_fenced IS NOT NULL THEN
        outcome := 'fenced'; body := v_fenced::text;
        RETURN;
    END IF;
    body := boxoffice_check_sequencer(p_lock, p_sequencer)::text;
    IF body IS NOT NULL THEN
        outcome := 'stale_sequencer';
        RETURN;
    END IF;
    SELECT m.state, m.move_id INTO v_state, v_move
      FROM boxoffice_event_moves m WHERE m.event_id = p_event_id FOR UPDATE;
    IF v_state = 'moved' AND v_move = p_move_id THEN
        outcome := 'moved'; body := '{"bookings": 0}';  -- done already: committed below
    ELSIF v_state IS DISTINCT FROM 'frozen' OR v_move <> p_move_id THEN
        outcome := 'not_frozen';
        body := jsonb_build_object('state', v_state, 'moveId', v_move)::text;
        RETURN;
    ELSE
        v_bookings := boxoffice_move_delete_rows(p_event_id);
        UPDATE boxoffice_event_moves
           SET state = 'moved', peer_shard = p_target_shard, updated_at = now()
         WHERE event_id = p_event_id;
        outcome := 'moved'; body := jsonb_build_object('bookings', v_bookings)::text;
    END IF;
    PERFORM boxoffice_sync_mark();  -- a commit record, so a synchronous wait (see above)
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- Target, rolling a move back before its flip: delete what this move imported. The
-- state row becomes a tombstone naming the source, where the event still is (it
-- answers `event_moved` to a stray write, as any tombstone does).
CREATE OR REPLACE PROCEDURE boxoffice_move_abandon_committed(
    p_event_id uuid,
    p_move_id text,
    p_epoch bigint,
    p_lock text,
    p_sequencer bigint,
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced jsonb;
    v_state text;
    v_move text;
BEGIN
    v_fenced := boxoffice_check_epoch(p_epoch);
    IF v_fenced IS NOT NULL THEN
        outcome := 'fenced'; body := v_fenced::text;
        RETURN;
    END IF;
    body := boxoffice_check_sequencer(p_lock, p_sequencer)::text;
    IF body IS NOT NULL THEN
        outcome := 'stale_sequencer';
        RETURN;
    END IF;
    SELECT m.state, m.move_id INTO v_state, v_move
      FROM boxoffice_event_moves m WHERE m.event_id = p_event_id FOR UPDATE;
    IF v_state IS DISTINCT FROM 'importing' OR v_move <> p_move_id THEN
        -- nothing of ours (never imported, or abandoned already): committed below
        outcome := 'abandoned'; body := jsonb_build_object('state', v_state)::text;
    ELSE
        PERFORM boxoffice_move_delete_rows(p_event_id);
        UPDATE boxoffice_event_moves SET state = 'moved', updated_at = now()
         WHERE event_id = p_event_id;
        outcome := 'abandoned'; body := '{}';
    END IF;
    PERFORM boxoffice_sync_mark();  -- a commit record, so a synchronous wait (see above)
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;
