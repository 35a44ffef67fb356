-- Creating an event with its tiers: one CALL, like a booking (shard_service/writes.py).
--
-- boxoffice_create_event_committed checks the caller's epoch (`fenced`, nothing
-- written), then:
--   created   the event and its tiers were inserted (each tier's remaining = capacity);
--   existing  the same event is here already (same name, venue, start, currency,
--             unlisted flag, and the same tiers by id, name, price and capacity): a
--             retry of the same creation. It calls boxoffice_sync_mark, so its COMMIT
--             writes a commit record and waits for the synchronous standbys: the
--             answer is not sent before they hold the earlier creation (whose own
--             wait may have been cancelled, so it may be on this primary alone);
--   different another event has this id here (`event-exists`, nothing written);
--   tier_taken a tier id is another event's here (nothing written);
--   event_moving / event_moved  the id has a move's state here (a move imports or
--             froze it, or it left this shard: the tombstone names where to).
-- Then COMMIT and the WAL position the commit reached, in the same round trip.
CREATE OR REPLACE PROCEDURE boxoffice_create_event_committed(
    p_event_id uuid,
    p_name text,
    p_venue text,
    p_starts_at timestamptz,
    p_currency text,
    p_unlisted boolean,
    p_tier_ids uuid[],
    p_tier_names text[],
    p_tier_prices integer[],
    p_tier_capacities integer[],
    p_epoch bigint,
    INOUT outcome text DEFAULT NULL,
    INOUT body text DEFAULT NULL,
    INOUT commit_lsn text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_fenced jsonb;
    v_refusal record;
    v_same boolean;
BEGIN
    v_fenced := boxoffice_check_epoch(p_epoch);
    IF v_fenced IS NOT NULL THEN
        outcome := 'fenced'; body := v_fenced::text;
        RETURN;
    END IF;
    -- Concurrent creations of one id queue here, so the second sees the first's rows.
    PERFORM pg_advisory_xact_lock(hashtext('boxoffice-event-' || p_event_id::text));
    SELECT r.outcome, r.body INTO v_refusal FROM boxoffice_event_write_refusal(p_event_id) r;
    IF v_refusal.outcome IS NOT NULL THEN
        outcome := v_refusal.outcome; body := v_refusal.body::text;
        RETURN;
    END IF;
    SELECT e.name = p_name AND e.venue = p_venue AND e.starts_at = p_starts_at
           AND e.currency = p_currency AND e.unlisted = p_unlisted
           AND (SELECT array_agg(t.id::text || '|' || t.name || '|' || t.price_cents || '|'
                                 || t.capacity ORDER BY t.id)
                  FROM ticket_tiers t WHERE t.event_id = e.id)
               IS NOT DISTINCT FROM
               (SELECT array_agg(x.id::text || '|' || x.name || '|' || x.price || '|' || x.capacity
                                 ORDER BY x.id)
                  FROM unnest(p_tier_ids, p_tier_names, p_tier_prices, p_tier_capacities)
                       AS x (id, name, price, capacity))
      INTO v_same
      FROM events e WHERE e.id = p_event_id;
    IF FOUND AND NOT v_same THEN
        outcome := 'different'; body := jsonb_build_object('eventId', p_event_id)::text;
        RETURN;
    END IF;
    IF FOUND THEN
        outcome := 'existing';
        PERFORM boxoffice_sync_mark();  -- a commit record, so a synchronous wait (see above)
    ELSE
        IF EXISTS (SELECT 1 FROM ticket_tiers t WHERE t.id = ANY (p_tier_ids)) THEN
            outcome := 'tier_taken'; body := '{}';
            RETURN;
        END IF;
        INSERT INTO events (id, name, venue, starts_at, currency, unlisted)
        VALUES (p_event_id, p_name, p_venue, p_starts_at, p_currency, p_unlisted);
        INSERT INTO ticket_tiers (id, event_id, name, price_cents, capacity, remaining)
        SELECT x.id, p_event_id, x.name, x.price, x.capacity, x.capacity
          FROM unnest(p_tier_ids, p_tier_names, p_tier_prices, p_tier_capacities)
               AS x (id, name, price, capacity);
        outcome := 'created';
    END IF;
    body := '{}';
    COMMIT;
    commit_lsn := pg_current_wal_insert_lsn()::text;
END
$$;
