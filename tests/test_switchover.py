"""Planned switchover (`boxoffice shard switchover`, `POST /admin/shards/{shard}/switchover`)
and the gateways riding through it, on the real cluster (tests/conftest.py `cluster`:
regions east and west, shard-a homed in east with its zone standby east/b, shard-b homed
in west with west/b; sync zone).

Every test leaves the cluster as it found it: each shard's primary in its home, every
copy running in its map role and passing its health check.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest

from deploy.cluster import Cluster
from failover import NodeAgents
from failover.switchover import journal_id, resume_switchover, switchover
from region_map import NotFound
from tests.conftest import ADMIN_TOKEN
from tests.support import check_invariants, create_event_doc, gateway_url
from tests.test_promote import (
    AUTH,
    HOME,
    agent_copy,
    read_shard,
    run_cli,
    store_for,
    wait_copies_settled,
    wait_for,
)

BOOKERS = ("east", "west") * 4  # 8 concurrent clients, through both gateways
RESENDERS = 8  # clients replaying the confirmed requests at once


@dataclass
class Seen:
    """What the clients were answered: every confirmed booking (request key -> booking id),
    every status, and when each confirmation came."""

    confirmed: dict[str, str] = field(default_factory=dict)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    confirmed_at: list[float] = field(default_factory=list)

    def since(self, moment: float) -> int:
        return sum(1 for t in self.confirmed_at if t > moment)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time between two confirmations while a change ran (the pause the
        clients saw): from the last one before `start` to the first one after `end`."""
        times = sorted(self.confirmed_at)
        before = [t for t in times if t <= start][-1:]
        after = [t for t in times if t > end][:1]
        points = before + [t for t in times if start < t <= end] + after
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


# The buyer's secret of each booking key (its reference, or the key the gateway returned),
# as the careful client below keeps it: every resend carries it (tests/test_booking_ownership.py).
_SECRETS: dict[str, str] = {}


def booking_body(event: dict[str, Any], reference: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"eventId": event["id"],
                            "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}
    if reference is not None:
        body["clientReference"] = reference
    return body


async def book_until_answered(session: aiohttp.ClientSession, url: str, event: dict[str, Any],
                              reference: str | None, seen: Seen, stop: asyncio.Event | None = None
                              ) -> tuple[str, str] | None:
    """One logical booking, as a careful client makes it: with its reference, or with none
    and then the `Idempotency-Key` the gateway returned, retried until it is answered
    2xx. (key, booking id); None when stopped before (or no key was ever returned). Every
    attempt carries the client's own Booking-Secret, kept with the key."""
    key: str | None = reference
    secret = _SECRETS.setdefault(reference, secrets.token_urlsafe(32)) if reference else \
        secrets.token_urlsafe(32)
    while stop is None or not stop.is_set():
        headers = {} if reference is not None or key is None else {"Idempotency-Key": key}
        headers["Booking-Secret"] = secret
        try:
            async with session.post(f"{url}/api/bookings", json=booking_body(event, reference),
                                    headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                body = await resp.json(content_type=None)
                seen.statuses[str(resp.status)] += 1
                key = key or resp.headers.get("Idempotency-Key")
                if key is not None:
                    _SECRETS[key] = secret
                if resp.status in (200, 201):
                    assert key is not None
                    return key, str(body["id"])
                assert resp.status == 503, body  # anything else is a defect here
        except (aiohttp.ClientError, TimeoutError) as exc:
            seen.statuses[exc.__class__.__name__] += 1
            if key is None:
                return None  # no key to replay with: the outcome is unknown to this client
        await asyncio.sleep(0.05)  # the client's own pause before sending again
    return None


async def booker(session: aiohttp.ClientSession, url: str, event: dict[str, Any], stop: asyncio.Event,
                 seen: Seen, with_reference: bool = True) -> None:
    while not stop.is_set():
        reference = f"switch-{uuid.uuid4().hex}" if with_reference else None
        result = await book_until_answered(session, url, event, reference, seen, stop)
        if result is not None:
            key, booking_id = result
            assert key not in seen.confirmed
            seen.confirmed[key] = booking_id
            seen.confirmed_at.append(time.monotonic())


async def bookings_on(dsn: str, event_id: str) -> dict[str, list[str]]:
    """client reference -> booking ids, on one database."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id::text, client_reference FROM bookings WHERE event_id = $1",
                                uuid.UUID(event_id))
    finally:
        await conn.close()
    found: dict[str, list[str]] = collections.defaultdict(list)
    for row in rows:
        found[row["client_reference"]].append(row["id"])
    return found


async def switch(cluster: Cluster, shard: str, to: str) -> dict[str, Any]:
    code, out = await run_cli(cluster, "shard", "switchover", shard, "--to", to, "--json")
    assert code == 0, out
    report: dict[str, Any] = json.loads(out)
    print(json.dumps({k: report[k] for k in ("oldPrimary", "newPrimary", "newEpoch", "writesHeldSeconds",
                                             "seconds", "steps")}, indent=1))
    return report


async def old_primary_follows(cluster: Cluster, shard: str, old: str, new: str) -> None:
    """The old primary streams from the new one: the new primary's pg_stat_replication
    lists it (by its application_name) as streaming."""
    name = (await agent_copy(cluster, old, shard))["name"]
    deadline = time.monotonic() + 60
    while True:
        conn = await asyncpg.connect(cluster.databases[(shard, new)].dsn)
        try:
            state = await conn.fetchval("SELECT state FROM pg_stat_replication WHERE application_name = $1",
                                        name)
        finally:
            await conn.close()
        if state == "streaming":
            return
        assert time.monotonic() < deadline, f"{old} does not stream from {new} ({state})"
        await asyncio.sleep(0.1)  # poll interval


# --- acceptance 1: a switchover under 8 concurrent bookers -------------------------------------

async def test_switchover_under_load_loses_nothing_and_no_client_sees_an_error(cluster: Cluster) -> None:
    before = await wait_copies_settled(cluster, "shard-a")
    assert before.primary_copy == "east" and "east/b" in before.sync_standbys
    seen = Seen()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        event = await create_event_doc(session, gateway_url(cluster, "east"), [100_000], shard="shard-a")
        clients = [asyncio.create_task(booker(session, gateway_url(cluster, region), event, stop, seen))
                   for region in BOOKERS]
        try:
            await wait_for(lambda: len(seen.confirmed) >= 40, "bookings before the switchover")
            started = time.monotonic()
            report = await switch(cluster, "shard-a", "east/b")
            ended = time.monotonic()
            assert report["outcome"] == "switched-over" and report["newPrimary"] == "east/b"
            assert report["oldPrimary"] == "east" and report["newEpoch"] == before.epoch + 1
            assert report["oldPrimaryRestarted"] is True
            assert [s["name"] for s in report["steps"]][:7] == [
                "check", "sync-set", "repoint", "hold", "stop", "drain", "commit"]
            await wait_for(lambda: seen.since(ended) >= 40, "bookings after the switchover")
        finally:
            stop.set()
            await asyncio.gather(*clients)
    print(f"switchover: clients' longest pause {seen.longest_gap(started, ended):.3f}s, gateways held "
          f"writes {report['writesHeldSeconds']}s, command {ended - started:.2f}s; "
          f"{len(seen.confirmed)} bookings, statuses {dict(seen.statuses)}")
    assert set(seen.statuses) <= {"200", "201"}, f"a client saw an error: {dict(seen.statuses)}"

    after, _ = await read_shard(cluster, "shard-a")
    assert after.primary_copy == "east/b" and after.epoch == before.epoch + 1
    assert after.transition is None and after.epoch_lsn == report["epochLsn"]
    new_primary = cluster.databases[("shard-a", "east/b")].dsn
    stored = await bookings_on(new_primary, event["id"])
    missing = {k for k, b in seen.confirmed.items() if stored.get(k) != [b]}
    assert not missing, f"{len(missing)} confirmed bookings are missing or different on the new primary"
    await check_invariants(new_primary, event["id"])

    # afterwards: the old primary streams from the new one, every copy healthy
    await old_primary_follows(cluster, "shard-a", "east", "east/b")
    record = await wait_copies_settled(cluster, "shard-a")
    assert record.primary_copy == "east/b"

    # and back home, through a gateway's admin API
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway_url(cluster, 'west')}/admin/shards/shard-a/switchover",
                                json={"to": "east"}, headers=AUTH,
                                timeout=aiohttp.ClientTimeout(total=120)) as resp:
            back = await resp.json(content_type=None)
            assert resp.status == 200, back
    assert back["newPrimary"] == "east" and back["newEpoch"] == before.epoch + 2
    print(f"back home: gateways held writes {back['writesHeldSeconds']}s")
    await old_primary_follows(cluster, "shard-a", "east/b", "east")
    record = await wait_copies_settled(cluster, "shard-a")
    assert record.primary_copy == HOME["shard-a"]


# --- acceptance 5: no booking twice across a switchover and a promotion ------------------------

async def test_retried_bookings_are_never_made_twice_across_a_switchover_and_a_promotion(
        cluster: Cluster) -> None:
    before = await wait_copies_settled(cluster, "shard-b")
    assert before.primary_copy == "west"
    seen_ref, seen_key = Seen(), Seen()
    async with aiohttp.ClientSession() as session:
        event = await create_event_doc(session, gateway_url(cluster, "west"), [100_000], shard="shard-b")

        async def under_load(change: Any) -> None:
            stop = asyncio.Event()
            clients = [asyncio.create_task(booker(session, gateway_url(cluster, region), event, stop,
                                                  seen, with_reference=seen is seen_ref))
                       for region in ("east", "west") for seen in (seen_ref, seen_key) for _ in range(2)]
            try:
                base = len(seen_ref.confirmed) + len(seen_key.confirmed)
                await wait_for(lambda: len(seen_ref.confirmed) + len(seen_key.confirmed) >= base + 30,
                               "bookings before the change")
                done = time.monotonic()
                await change()
                await wait_for(lambda: seen_ref.since(done) + seen_key.since(done) >= 30,
                               "bookings after the change")
            finally:
                stop.set()
                await asyncio.gather(*clients)

        async def resend_everything() -> None:
            """Every confirmed request sent again, as a client that lost the answer would:
            the same reference, or no reference and the returned key. Each is answered with
            the booking it made, never a new one. Sent by RESENDERS clients at once (one
            at a time, hundreds of replays take longer than the changes they check)."""
            again = Seen()
            todo = [(key, booking_id, with_reference)
                    for seen, with_reference in ((seen_ref, True), (seen_key, False))
                    for key, booking_id in list(seen.confirmed.items())]

            async def resender(share: list[tuple[str, str, bool]]) -> None:
                for key, booking_id, with_reference in share:
                    if with_reference:
                        result = await book_until_answered(session, gateway_url(cluster, "east"),
                                                           event, key, again)
                    else:
                        result = await _replay_with_key(session, gateway_url(cluster, "east"), event,
                                                        key, again)
                    assert result == (key, booking_id), (key, booking_id, result)
            await asyncio.gather(*(resender(todo[n::RESENDERS]) for n in range(RESENDERS)))

        await under_load(lambda: switch(cluster, "shard-b", "west/b"))
        await resend_everything()
        await wait_copies_settled(cluster, "shard-b")

        async def promote_home() -> None:
            code, out = await run_cli(cluster, "shard", "promote", "shard-b", "--to", "west")
            print(out)
            assert code == 0, out

        await under_load(promote_home)
        await resend_everything()

    record = await wait_copies_settled(cluster, "shard-b")
    assert record.primary_copy == HOME["shard-b"] and record.epoch == before.epoch + 2
    primary = cluster.databases[("shard-b", "west")].dsn
    stored = await bookings_on(primary, event["id"])
    for seen in (seen_ref, seen_key):
        for key, booking_id in seen.confirmed.items():
            assert stored.get(key) == [booking_id], (key, booking_id, stored.get(key))
    assert all(len(ids) == 1 for ids in stored.values()), "a key names two bookings"
    await check_invariants(primary, event["id"])
    print(f"with references: {len(seen_ref.confirmed)} bookings, {dict(seen_ref.statuses)}; "
          f"with returned keys: {len(seen_key.confirmed)}, {dict(seen_key.statuses)}")


async def _replay_with_key(session: aiohttp.ClientSession, url: str, event: dict[str, Any], key: str,
                           seen: Seen) -> tuple[str, str] | None:
    async with session.post(f"{url}/api/bookings", json=booking_body(event, None),
                            headers={"Idempotency-Key": key, "Booking-Secret": _SECRETS[key]},
                            timeout=aiohttp.ClientTimeout(total=30)) as resp:
        body = await resp.json(content_type=None)
        seen.statuses[str(resp.status)] += 1
        assert resp.status in (200, 201), body
        return key, str(body["id"])


# --- refusals and an interrupted switchover ----------------------------------------------------

async def test_a_switchover_outside_the_sync_set_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    original, _ = await read_shard(cluster, "shard-b")
    async with store_for(cluster) as store:  # a record whose set leaves east out, whatever the topology
        await store.update_shard("shard-b", lambda s: s.with_sync_standbys(["west/b"]))
    try:
        await _refusals(cluster)
    finally:
        async with store_for(cluster) as store:
            await store.update_shard("shard-b", lambda s: s.with_sync_standbys(original.sync_standbys))


async def _refusals(cluster: Cluster) -> None:
    before, index = await read_shard(cluster, "shard-b")
    assert "east" not in before.sync_standbys
    code, out = await run_cli(cluster, "shard", "switchover", "shard-b", "--to", "east", "--json")
    assert code == 1 and json.loads(out)["kind"] == "not-in-sync-set", out
    async with aiohttp.ClientSession() as session:
        url = f"{gateway_url(cluster, 'east')}/admin/shards/shard-b/switchover"
        async with session.post(url, json={"to": "east"}, headers=AUTH) as resp:
            assert resp.status == 409 and (await resp.json())["type"].endswith("/not-in-sync-set")
        async with session.post(url, json={"to": "west/b", "force": True}, headers=AUTH) as resp:
            assert resp.status == 400  # no --force for a planned switchover
        async with session.post(url, json={"to": "west/b"}) as resp:
            assert resp.status == 401
    assert await read_shard(cluster, "shard-b") == (before, index)


class Interrupted(Exception):
    pass


async def test_a_switchover_interrupted_before_its_commit_point_is_rolled_back(cluster: Cluster) -> None:
    before = await wait_copies_settled(cluster, "shard-b")

    async def die_after_stop(step: str) -> None:
        if step == "stop":
            raise Interrupted(step)

    async with store_for(cluster) as store, NodeAgents(store, ADMIN_TOKEN) as agents:
        with pytest.raises(Interrupted):
            await switchover(store, agents, "shard-b", "west/b", fault_hook=die_after_stop)
        held, _ = await store.read_shard("shard-b")
        assert held.transition is not None and held.transition.target == "west/b"
        assert held.primary_copy == "west" and held.epoch == before.epoch
        assert not (await agent_copy(cluster, "west", "shard-b"))["running"]

        report = await resume_switchover(store, agents, "shard-b")
        assert report is not None and report.resumed == "rolled-back", report
        with pytest.raises(NotFound):
            await store.read_journal(journal_id("shard-b"))
    after = await wait_copies_settled(cluster, "shard-b")
    assert after.primary_copy == "west" and after.epoch == before.epoch and after.transition is None

    async with aiohttp.ClientSession() as session:  # booking works again, on the same primary
        event = await create_event_doc(session, gateway_url(cluster, "west"), [10], shard="shard-b")
        result = await book_until_answered(session, gateway_url(cluster, "east"), event,
                                           f"switch-{uuid.uuid4().hex}", Seen())
        assert result is not None
    await check_invariants(cluster.databases[("shard-b", "west")].dsn, event["id"])
