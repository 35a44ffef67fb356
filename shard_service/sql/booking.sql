-- boxoffice booking functions: every write is one round trip (one CALL).
--
-- Tier rows are always locked in id order, so two bookings naming the same
-- tiers in opposite orders queue behind each other instead of deadlocking.
-- Each function returns (outcome, body): `outcome` picks the HTTP status in
-- the booking service, `body` is the JSON document or the error's details.

CREATE OR REPLACE FUNCTION boxoffice_booking_json(p_booking_id uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', b.id,
        'eventId', b.event_id,
        'clientReference', b.client_reference,
        'status', b.status,
        'items', (
            SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'ticketTierId', i.ticket_tier_id,
                       'quantity', i.quantity,
                       'unitPriceCents', i.unit_price_cents) ORDER BY i.ticket_tier_id), '[]'::jsonb)
            FROM booking_items i WHERE i.booking_id = b.id),
        'totalCents', b.total_cents,
        'currency', b.currency,
        'createdAt', to_char(b.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'cancelledAt', to_char(b.cancelled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
    FROM bookings b WHERE b.id = p_booking_id
$$;

-- Whether a caller's secret hash is the booking's (MISSION.md §6, sql/seed.sql): equal
-- hashes, or both NULL (an internal caller's booking made without a secret; a gateway
-- always sends one, so no public caller matches a NULL). Hashes are compared, never
-- secrets: how long a comparison of SHA-256 values takes tells nothing about a secret.
CREATE OR REPLACE FUNCTION boxoffice_owns(p_stored bytea, p_given bytea)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$ SELECT p_stored IS NOT DISTINCT FROM p_given $$;

-- The answer for a client reference that already names a booking. A caller without the
-- booking's secret gets `reference_in_use` and nothing else, whatever its event and
-- items (never the booking, its id, or whether the request matched it: references are
-- guessable). The owner gets the same booking when the request is the same (event and
-- items), else `reference_conflict`.
DROP FUNCTION IF EXISTS boxoffice_replay(uuid, uuid, uuid[], integer[]);
CREATE OR REPLACE FUNCTION boxoffice_replay(
    p_existing_id uuid, p_event_id uuid, p_tier_ids uuid[], p_quantities integer[],
    p_secret_hash bytea, OUT outcome text, OUT body jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_owner boolean;
    v_same boolean;
BEGIN
    SELECT boxoffice_owns(b.secret_hash, p_secret_hash) INTO v_owner
      FROM bookings b WHERE b.id = p_existing_id;
    IF NOT coalesce(v_owner, false) THEN
        outcome := 'reference_in_use';
        body := '{}'::jsonb;
        RETURN;
    END IF;
    SELECT b.event_id = p_event_id
           AND (SELECT array_agg(i.ticket_tier_id::text || ':' || i.quantity ORDER BY i.ticket_tier_id)
                FROM booking_items i WHERE i.booking_id = b.id)
             = (SELECT array_agg(x.tier_id::text || ':' || x.qty ORDER BY x.tier_id)
                FROM unnest(p_tier_ids, p_quantities) AS x (tier_id, qty))
      INTO v_same
      FROM bookings b WHERE b.id = p_existing_id;
    IF v_same THEN
        outcome := 'existing';
        body := boxoffice_booking_json(p_existing_id);
    ELSE
        outcome := 'reference_conflict';
        body := '{}'::jsonb;
    END IF;
END
$$;

-- The checks of a booking request that need no lock: the shape of its items
-- and its event. NULL outcome: go on (`currency` is the event's).
CREATE OR REPLACE FUNCTION boxoffice_book_precheck(
    p_event_id uuid, p_tier_ids uuid[], p_quantities integer[],
    OUT outcome text, OUT body jsonb, OUT currency text)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF coalesce(cardinality(p_tier_ids), 0) = 0
       OR cardinality(p_tier_ids) <> coalesce(cardinality(p_quantities), 0) THEN
        outcome := 'invalid'; body := jsonb_build_object('reason', 'items must be a non-empty list');
        RETURN;
    END IF;
    IF (SELECT count(DISTINCT t) FROM unnest(p_tier_ids) t) <> cardinality(p_tier_ids) THEN
        outcome := 'invalid'; body := jsonb_build_object('reason', 'a ticket tier appears twice');
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_quantities) q WHERE q IS NULL OR q < 1) THEN
        outcome := 'invalid'; body := jsonb_build_object('reason', 'quantity must be at least 1');
        RETURN;
    END IF;

    SELECT e.currency INTO currency FROM events e WHERE e.id = p_event_id;
    IF NOT FOUND THEN
        body := boxoffice_tombstone(p_event_id, NULL);  -- moved away (sql/moves.sql)?
        outcome := CASE WHEN body IS NULL THEN 'event_not_found' ELSE 'event_moved' END;
        body := coalesce(body, jsonb_build_object('eventId', p_event_id));
    END IF;
END
$$;

-- The rest of a booking, once its tiers are locked by the caller's transaction
-- (boxoffice_book locks one request's; boxoffice_book_committed_batch locks the
-- union of a batch's once). Checks before it writes: a refusal writes nothing, so
-- a refused request in a batch leaves the others' work alone. `p_secret_hash`: the
-- SHA-256 of the buyer's secret, stored with the booking (NULL: none was sent).
DROP FUNCTION IF EXISTS boxoffice_book_locked(uuid, uuid, text, uuid[], integer[], text);
CREATE OR REPLACE FUNCTION boxoffice_book_locked(
    p_booking_id uuid,
    p_event_id uuid,
    p_client_reference text,
    p_tier_ids uuid[],
    p_quantities integer[],
    p_currency text,
    p_secret_hash bytea,
    OUT outcome text,
    OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_existing uuid;
    v_total bigint := 0;
    v_row record;
    v_inserted uuid;
BEGIN
    -- 1b. The event's write state (sql/moves.sql), read now that its tiers are locked:
    --     a move's freeze takes the same locks, so a booking is either committed before
    --     the freeze or sees it here. A replay is refused too while the event moves (the
    --     booking is answered by whichever shard holds the event afterwards).
    SELECT r.outcome, r.body INTO outcome, body FROM boxoffice_event_write_refusal(p_event_id) r;
    IF outcome IS NOT NULL THEN
        RETURN;
    END IF;

    -- 2. Idempotency. Looked up after the locks: a duplicate that queued
    --    behind the first booking of its reference sees that booking here, and
    --    so does a duplicate later in the same batch (same transaction).
    IF p_client_reference IS NOT NULL THEN
        SELECT b.id INTO v_existing FROM bookings b WHERE b.client_reference = p_client_reference;
        IF FOUND THEN
            SELECT r.outcome, r.body INTO outcome, body
              FROM boxoffice_replay(v_existing, p_event_id, p_tier_ids, p_quantities,
                                    p_secret_hash) r;
            RETURN;
        END IF;
    END IF;

    -- 3. Every tier belongs to the event and has enough tickets left.
    FOR v_row IN
        SELECT x.tier_id, x.qty, t.id AS found_id, t.event_id, t.name, t.remaining, t.price_cents
        FROM unnest(p_tier_ids, p_quantities) AS x (tier_id, qty)
        LEFT JOIN ticket_tiers t ON t.id = x.tier_id
        ORDER BY x.tier_id
    LOOP
        IF v_row.found_id IS NULL OR v_row.event_id <> p_event_id THEN
            outcome := 'tier_not_in_event';
            body := jsonb_build_object('ticketTierId', v_row.tier_id, 'eventId', p_event_id);
            RETURN;
        END IF;
        IF v_row.remaining < v_row.qty THEN
            outcome := 'sold_out';
            body := jsonb_build_object('ticketTierId', v_row.tier_id, 'tierName', v_row.name,
                                       'requested', v_row.qty, 'remaining', v_row.remaining);
            RETURN;
        END IF;
        v_total := v_total + v_row.price_cents::bigint * v_row.qty;
    END LOOP;

    -- 4. The booking. A concurrent duplicate of the reference that named
    --    other tiers (so did not queue on our locks) is caught here.
    INSERT INTO bookings (id, event_id, client_reference, total_cents, currency, secret_hash)
    VALUES (p_booking_id, p_event_id, p_client_reference, v_total, p_currency, p_secret_hash)
    ON CONFLICT DO NOTHING
    RETURNING id INTO v_inserted;
    IF v_inserted IS NULL THEN
        SELECT b.id INTO v_existing FROM bookings b
         WHERE b.client_reference = p_client_reference OR b.id = p_booking_id;
        SELECT r.outcome, r.body INTO outcome, body
          FROM boxoffice_replay(v_existing, p_event_id, p_tier_ids, p_quantities, p_secret_hash) r;
        RETURN;
    END IF;

    UPDATE ticket_tiers t SET remaining = t.remaining - x.qty
      FROM unnest(p_tier_ids, p_quantities) AS x (tier_id, qty)
     WHERE t.id = x.tier_id;

    INSERT INTO booking_items (booking_id, ticket_tier_id, quantity, unit_price_cents)
    SELECT p_booking_id, t.id, x.qty, t.price_cents
      FROM unnest(p_tier_ids, p_quantities) AS x (tier_id, qty)
      JOIN ticket_tiers t ON t.id = x.tier_id;

    outcome := 'created';
    body := boxoffice_booking_json(p_booking_id);
END
$$;

-- One booking: check, 1. lock its tiers (always in id order), then the rest.
DROP FUNCTION IF EXISTS boxoffice_book(uuid, uuid, text, uuid[], integer[]);
CREATE OR REPLACE FUNCTION boxoffice_book(
    p_booking_id uuid,
    p_event_id uuid,
    p_client_reference text,
    p_tier_ids uuid[],
    p_quantities integer[],
    p_secret_hash bytea,
    OUT outcome text,
    OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_currency text;
BEGIN
    SELECT c.outcome, c.body, c.currency INTO outcome, body, v_currency
      FROM boxoffice_book_precheck(p_event_id, p_tier_ids, p_quantities) c;
    IF outcome IS NOT NULL THEN
        RETURN;
    END IF;

    -- 1. Lock the tiers, always in id order.
    PERFORM 1 FROM ticket_tiers t WHERE t.id = ANY (p_tier_ids) ORDER BY t.id FOR UPDATE;

    SELECT b.outcome, b.body INTO outcome, body
      FROM boxoffice_book_locked(p_booking_id, p_event_id, p_client_reference, p_tier_ids,
                                 p_quantities, v_currency, p_secret_hash) b;
END
$$;

-- Cancel: lock the booking's tiers (id order, as every write does: before any row of
-- the booking), then read the event's write state (a move's freeze holds the same
-- locks), then flip the booking. Concurrent cancels of one booking queue on the tier
-- locks; only the one that flips 'confirmed' to 'cancelled' returns the tickets.
-- Only the buyer cancels: a booking whose secret hash is not `p_secret_hash`
-- (boxoffice_owns) is answered exactly as a booking that is not here.
DROP FUNCTION IF EXISTS boxoffice_cancel(uuid);
CREATE OR REPLACE FUNCTION boxoffice_cancel(p_booking_id uuid, p_secret_hash bytea,
                                            OUT outcome text, OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_event_id uuid;
    v_id uuid;
BEGIN
    SELECT b.event_id INTO v_event_id FROM bookings b
     WHERE b.id = p_booking_id AND boxoffice_owns(b.secret_hash, p_secret_hash);
    IF NOT FOUND THEN
        body := boxoffice_tombstone(NULL, p_booking_id);  -- its event moved away?
        outcome := CASE WHEN body IS NULL THEN 'not_found' ELSE 'event_moved' END;
        body := coalesce(body, jsonb_build_object('bookingId', p_booking_id));
        RETURN;
    END IF;

    PERFORM 1 FROM ticket_tiers t
     WHERE t.id IN (SELECT i.ticket_tier_id FROM booking_items i WHERE i.booking_id = p_booking_id)
     ORDER BY t.id FOR UPDATE;
    SELECT r.outcome, r.body INTO outcome, body FROM boxoffice_event_write_refusal(v_event_id) r;
    IF outcome IS NOT NULL THEN
        RETURN;
    END IF;

    UPDATE bookings SET status = 'cancelled', cancelled_at = now()
     WHERE id = p_booking_id AND status = 'confirmed'
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        outcome := 'already_cancelled'; body := boxoffice_booking_json(p_booking_id);
        RETURN;
    END IF;
    UPDATE ticket_tiers t SET remaining = t.remaining + i.quantity
      FROM booking_items i
     WHERE i.booking_id = p_booking_id AND t.id = i.ticket_tier_id;

    outcome := 'cancelled';
    body := boxoffice_booking_json(p_booking_id);
END
$$;

-- The caller's epoch against the database's (fencing layer 2, docs/failover.md).
--
-- Every write takes the epoch lock in shared mode, then reads the epoch row;
-- every write of the epoch row takes it exclusively, through the statement
-- trigger below, whoever writes it (node_agent.epoch.write_epoch, an operator).
-- A transaction-level lock is held to the end of the transaction, through its
-- commit and any synchronous-replication wait. So on one server:
--   - an epoch write waits until every booking, cancel or event creation that
--     read the old epoch has committed or rolled back: none of them can commit
--     after the new epoch is written;
--   - a write that arrives while an epoch write waits or runs queues behind it
--     (the lock manager grants in order: a shared request waits behind a waiting
--     exclusive one), then reads the row in a snapshot taken after the lock was
--     granted (a new statement, READ COMMITTED), sees the new epoch and is fenced.
-- Why not `SELECT ... FOR SHARE` of the row: a row share lock lets new share
-- lockers in ahead of a waiting updater (heap_lock_tuple does not sleep when the
-- row is only share-locked), so under steady bookings an epoch write could wait
-- for ever; and each one writes a WAL record and a MultiXact on one hot row. The
-- advisory lock is in memory only and its queue is fair.
-- Lock order: the epoch lock first, then tiers or the booking; an epoch write
-- takes nothing else, so there is no deadlock. On a promoted server the old
-- primary's in-flight bookings are not there anyway; this protects a server that
-- is still taking writes when its epoch moves on.
-- (A refusal commits nothing but may have an xid; a replay takes tier locks, so
-- it has one: every CALL that read a booking waits for the synchronous standbys
-- up to its own commit, past every commit it read, so an `existing` answer is as
-- durable as a `created` one.)
CREATE OR REPLACE FUNCTION boxoffice_epoch_lock_key()
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext('boxoffice_epoch')::bigint $$;

CREATE OR REPLACE FUNCTION boxoffice_epoch_write_lock()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(boxoffice_epoch_lock_key());
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER boxoffice_epoch_write_lock
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON boxoffice_epoch
    FOR EACH STATEMENT EXECUTE FUNCTION boxoffice_epoch_write_lock();

-- NULL when the caller's epoch is the stored one, else the details of a `fenced`
-- answer (a missing row is a mismatch too). Every write calls it first, before it
-- touches any other row. VOLATILE (the default): its SELECT takes its snapshot
-- after the lock is granted.
CREATE OR REPLACE FUNCTION boxoffice_check_epoch(p_epoch bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_stored bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(boxoffice_epoch_lock_key());
    SELECT e.epoch INTO v_stored FROM boxoffice_epoch e;
    IF p_epoch IS NOT NULL AND v_stored IS NOT DISTINCT FROM p_epoch THEN
        RETURN NULL;
    END IF;
    RETURN jsonb_build_object('epoch', v_stored, 'asked', p_epoch);
END
$$;

-- Make this transaction's COMMIT wait for the synchronous standbys, although it may
-- change nothing (a retry that finds its work done). Postgres waits for them only
-- when the transaction has an id AND has written WAL before its commit record
-- (RecordTransactionCommit: a bare pg_current_xact_id() is not enough); a
-- transactional logical message gives it both, with no row to lock (any wal_level;
-- nothing decodes it). The commit record it gets is past every commit this
-- transaction could see, so once the standbys hold it they hold those too.
CREATE OR REPLACE FUNCTION boxoffice_sync_mark()
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_logical_emit_message(true, 'boxoffice-sync-mark', '');
END
$$;

-- The booking service's write entry points. Each checks the caller's epoch
-- (a mismatch is outcome `fenced` and writes nothing), runs its function,
-- commits, and returns the WAL position the commit reached, all in one round
-- trip: the position goes into the client's consistency token (read-your-writes,
-- MISSION.md section 4), and it must be read after the commit, which a function
-- cannot do. The insert position is at or past the end of every commit record
-- this transaction could see (ours, or the earlier booking of a replayed
-- reference), whatever synchronous_commit says. CALL must be sent outside a
-- transaction block.
--
-- A replay (a booking answered `existing`, a cancel `already_cancelled`) changes
-- nothing, so its transaction would get no id, write no commit record, and its COMMIT
-- would wait for no standby: it could answer success for an earlier attempt whose
-- commit is only on this primary (its synchronous wait cancelled), which a failover
-- loses. It calls boxoffice_sync_mark first, so its COMMIT writes a record past that
-- earlier commit and waits until the synchronous standbys hold it, and with it
-- everything before it.
--
-- The signatures before the epoch parameter existed are dropped, so that no
-- caller can book past the fence through an old overload.
DROP PROCEDURE IF EXISTS boxoffice_book_committed(uuid, uuid, text, uuid[], integer[], text, text, text);
DROP PROCEDURE IF EXISTS boxoffice_cancel_committed(uuid, text, text, text);
-- And those before the buyer's secret hash (`p_secret_hash`, sql/seed.sql).
DROP PROCEDURE IF EXISTS boxoffice_book_committed(uuid, uuid, text, uuid[], integer[], bigint,
                                                  text, text, text);
DROP PROCEDURE IF EXISTS boxoffice_book_committed_batch(uuid[], uuid[], text[], integer[], integer[],
                                                        uuid[], integer[], bigint, text[], text[], text);
DROP PROCEDURE IF EXISTS boxoffice_cancel_committed(uuid, bigint, text, text, text);

CREATE OR REPLACE PROCEDURE boxoffice_book_committed(
    p_booking_id uuid,
    p_event_id uuid,
    p_client_reference text,
    p_tier_ids uuid[],
    p_quantities integer[],
    p_secret_hash bytea,
    p_epoch bigint,
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
    SELECT b.outcome, b.body::text INTO outcome, body
      FROM boxoffice_book(p_booking_id, p_event_id, p_client_reference, p_tier_ids, p_quantities,
                          p_secret_hash) b;
    IF outcome = 'existing' THEN
        PERFORM boxoffice_sync_mark();  -- a replay waits for the standbys too (see above)
    END IF;
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- A batch of bookings in one transaction: one epoch check, one lock of the
-- union of the batch's tiers (in id order, as every booking locks), then each
-- request in arrival order (array order) with exactly boxoffice_book's rules,
-- each its own outcome, then one COMMIT, one synchronous-replication wait, and
-- one commit position for all. The requests come as parallel arrays (one
-- element per request, its buyer's secret hash among them) and their items flattened (`p_item_request` is the
-- 1-based request each item belongs to). `p_budgets_ms`: how long each caller
-- still waited when the batch was sent; a request reached after its budget is
-- `expired` and writes nothing (no work for a caller that gave up). Refusals
-- write nothing, so one bad request never touches the others; a request is
-- reached only after those before it, so within a tier earlier arrivals are
-- served first and a later, smaller request may still fit after a refusal.
-- The fence: the whole batch is `fenced` (nothing written) or none of it is.
CREATE OR REPLACE PROCEDURE boxoffice_book_committed_batch(
    p_booking_ids uuid[],
    p_event_ids uuid[],
    p_client_references text[],
    p_secret_hashes bytea[],
    p_budgets_ms integer[],
    p_item_request integer[],
    p_item_tier_ids uuid[],
    p_item_quantities integer[],
    p_epoch bigint,
    INOUT outcomes text[] DEFAULT NULL,
    INOUT bodies text[] DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced jsonb;
    v_n integer := coalesce(cardinality(p_booking_ids), 0);
    v_started timestamptz := clock_timestamp();
    v_tiers uuid[];
    v_quantities integer[];
    v_currency text;
    v_outcome text;
    v_body jsonb;
BEGIN
    v_fenced := boxoffice_check_epoch(p_epoch);
    IF v_fenced IS NOT NULL THEN
        outcomes := array_fill('fenced'::text, ARRAY[v_n]);
        bodies := array_fill(v_fenced::text, ARRAY[v_n]);
        RETURN;
    END IF;

    PERFORM 1 FROM ticket_tiers t WHERE t.id = ANY (p_item_tier_ids) ORDER BY t.id FOR UPDATE;

    outcomes := '{}'; bodies := '{}';
    FOR i IN 1 .. v_n LOOP
        IF clock_timestamp() > v_started + make_interval(secs => p_budgets_ms[i] / 1000.0) THEN
            outcomes := outcomes || 'expired'::text; bodies := bodies || '{}'::text;
            CONTINUE;
        END IF;
        SELECT array_agg(x.tier_id ORDER BY x.n), array_agg(x.qty ORDER BY x.n)
          INTO v_tiers, v_quantities
          FROM unnest(p_item_request, p_item_tier_ids, p_item_quantities)
               WITH ORDINALITY AS x (req, tier_id, qty, n)
         WHERE x.req = i;
        SELECT c.outcome, c.body, c.currency INTO v_outcome, v_body, v_currency
          FROM boxoffice_book_precheck(p_event_ids[i], v_tiers, v_quantities) c;
        IF v_outcome IS NULL THEN
            SELECT b.outcome, b.body INTO v_outcome, v_body
              FROM boxoffice_book_locked(p_booking_ids[i], p_event_ids[i], p_client_references[i],
                                         v_tiers, v_quantities, v_currency, p_secret_hashes[i]) b;
        END IF;
        outcomes := outcomes || v_outcome; bodies := bodies || v_body::text;
    END LOOP;
    IF 'existing' = ANY (outcomes) THEN
        PERFORM boxoffice_sync_mark();  -- a replay waits for the standbys too (see above)
    END IF;
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

CREATE OR REPLACE PROCEDURE boxoffice_cancel_committed(
    p_booking_id uuid,
    p_secret_hash bytea,
    p_epoch bigint,
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
    SELECT c.outcome, c.body::text INTO outcome, body
      FROM boxoffice_cancel(p_booking_id, p_secret_hash) c;
    IF outcome = 'already_cancelled' THEN
        PERFORM boxoffice_sync_mark();  -- a replay waits for the standbys too (see above)
    END IF;
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

-- Read-your-writes on a replica: wait (briefly, server-side) until this
-- server has replayed WAL up to `p_lsn`. True when reached, false on timeout.
-- On a primary the position is always reached.
CREATE OR REPLACE FUNCTION boxoffice_wait_for_lsn(p_lsn pg_lsn, p_timeout_ms integer)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => p_timeout_ms / 1000.0);
BEGIN
    IF NOT pg_is_in_recovery() THEN
        RETURN true;
    END IF;
    LOOP
        IF pg_last_wal_replay_lsn() >= p_lsn THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.002);
    END LOOP;
END
$$;
