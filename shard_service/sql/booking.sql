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

-- The answer for a client reference that already names a booking: the same
-- booking when the request is the same (event and items), else a conflict.
CREATE OR REPLACE FUNCTION boxoffice_replay(
    p_existing_id uuid, p_event_id uuid, p_tier_ids uuid[], p_quantities integer[],
    OUT outcome text, OUT body jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_same boolean;
BEGIN
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
        body := jsonb_build_object('bookingId', p_existing_id);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION boxoffice_book(
    p_booking_id uuid,
    p_event_id uuid,
    p_client_reference text,
    p_tier_ids uuid[],
    p_quantities integer[],
    OUT outcome text,
    OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_existing uuid;
    v_currency text;
    v_total bigint := 0;
    v_row record;
    v_inserted uuid;
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

    SELECT e.currency INTO v_currency FROM events e WHERE e.id = p_event_id;
    IF NOT FOUND THEN
        outcome := 'event_not_found'; body := jsonb_build_object('eventId', p_event_id);
        RETURN;
    END IF;

    -- 1. Lock the tiers, always in id order.
    PERFORM 1 FROM ticket_tiers t WHERE t.id = ANY (p_tier_ids) ORDER BY t.id FOR UPDATE;

    -- 2. Idempotency. Looked up after the locks: a duplicate that queued
    --    behind the first booking of its reference sees that booking here.
    IF p_client_reference IS NOT NULL THEN
        SELECT b.id INTO v_existing FROM bookings b WHERE b.client_reference = p_client_reference;
        IF FOUND THEN
            SELECT r.outcome, r.body INTO outcome, body
              FROM boxoffice_replay(v_existing, p_event_id, p_tier_ids, p_quantities) r;
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
    INSERT INTO bookings (id, event_id, client_reference, total_cents, currency)
    VALUES (p_booking_id, p_event_id, p_client_reference, v_total, v_currency)
    ON CONFLICT DO NOTHING
    RETURNING id INTO v_inserted;
    IF v_inserted IS NULL THEN
        SELECT b.id INTO v_existing FROM bookings b
         WHERE b.client_reference = p_client_reference OR b.id = p_booking_id;
        SELECT r.outcome, r.body INTO outcome, body
          FROM boxoffice_replay(v_existing, p_event_id, p_tier_ids, p_quantities) r;
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

-- Cancel: the booking row lock makes concurrent cancels queue; only the one
-- that flips 'confirmed' to 'cancelled' returns the tickets.
CREATE OR REPLACE FUNCTION boxoffice_cancel(p_booking_id uuid, OUT outcome text, OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    UPDATE bookings SET status = 'cancelled', cancelled_at = now()
     WHERE id = p_booking_id AND status = 'confirmed'
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        IF EXISTS (SELECT 1 FROM bookings WHERE id = p_booking_id) THEN
            outcome := 'already_cancelled'; body := boxoffice_booking_json(p_booking_id);
        ELSE
            outcome := 'not_found'; body := jsonb_build_object('bookingId', p_booking_id);
        END IF;
        RETURN;
    END IF;

    PERFORM 1 FROM ticket_tiers t
     WHERE t.id IN (SELECT i.ticket_tier_id FROM booking_items i WHERE i.booking_id = p_booking_id)
     ORDER BY t.id FOR UPDATE;
    UPDATE ticket_tiers t SET remaining = t.remaining + i.quantity
      FROM booking_items i
     WHERE i.booking_id = p_booking_id AND t.id = i.ticket_tier_id;

    outcome := 'cancelled';
    body := boxoffice_booking_json(p_booking_id);
END
$$;

-- The booking service's write entry points. Each runs its function, commits,
-- and returns the WAL position the commit reached, all in one round trip: the
-- position goes into the client's consistency token (read-your-writes, MISSION.md
-- section 4), and it must be read after the commit, which a function cannot do.
-- The insert position is at or past the end of every commit record this
-- transaction could see (ours, or the earlier booking of a replayed reference),
-- whatever synchronous_commit says. CALL must be sent outside a transaction block.
CREATE OR REPLACE PROCEDURE boxoffice_book_committed(
    p_booking_id uuid,
    p_event_id uuid,
    p_client_reference text,
    p_tier_ids uuid[],
    p_quantities integer[],
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT b.outcome, b.body::text INTO outcome, body
      FROM boxoffice_book(p_booking_id, p_event_id, p_client_reference, p_tier_ids, p_quantities) b;
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;

CREATE OR REPLACE PROCEDURE boxoffice_cancel_committed(
    p_booking_id uuid,
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT c.outcome, c.body::text INTO outcome, body FROM boxoffice_cancel(p_booking_id) c;
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
