"""`boxoffice shard promote` and `POST /admin/shards/{shard}/promote` on the real cluster
(tests/conftest.py `cluster`: regions east and west, shard-a homed in east with its zone
standby east/b, shard-b homed in west with west/b; sync zone).

Every test leaves the cluster as it found it: each shard's primary in its home, every
copy running in its map role and passing its health check.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from deploy.cluster import Cluster
from failover import NodeAgents, promote
from failover.promote import journal_id
from region_map import BOOKING_SERVICE, ConsulMapStore, NotFound, Shard, passing_by_url
from tests.conftest import ADMIN_TOKEN
from tests.support import check_invariants, create_event_doc, gateway_url, poll

REPO = Path(__file__).resolve().parent.parent
HOME = {"shard-a": "east", "shard-b": "west"}
DEADLINE = 60.0
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# --- helpers ---------------------------------------------------------------------------------

def store_for(cluster: Cluster) -> ConsulMapStore:
    assert cluster.consul is not None
    return ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)


async def read_shard(cluster: Cluster, name: str) -> tuple[Shard, int]:
    async with store_for(cluster) as store:
        return await store.read_shard(name)


async def run_cli(cluster: Cluster, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`boxoffice --state-dir <the cluster's> ARGS` in a subprocess (cluster.json gives it
    Consul, the map prefix and the operator token), with `env` added to the environment;
    its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy.cli", "--state-dir", str(cluster.state_dir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
        env={**os.environ, **(env or {})})
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def agent_copy(cluster: Cluster, host: str, shard: str) -> dict[str, Any]:
    doc = await asyncio.to_thread(cluster.agent_call, host, "GET", "/agent/copies", None, 5.0)
    return next(c for c in doc["copies"] if c["shard"] == shard)


async def wait_copies_settled(cluster: Cluster, shard: str, timeout: float = DEADLINE) -> Shard:
    """Until every copy of `shard` runs in its map role (standbys streaming) and passes its
    health check in Consul; the shard record then."""
    deadline = time.monotonic() + timeout
    async with store_for(cluster) as store:
        while True:
            record, _ = await store.read_shard(shard)
            _, instances = await store.watch_instances(BOOKING_SERVICE, 0)
            health = passing_by_url(instances)
            problems = []
            for key, member in record.members.items():
                try:
                    copy = await agent_copy(cluster, key, shard)
                except OSError as exc:
                    problems.append(f"{key}: agent {exc}")
                    continue
                wanted = "primary" if key == record.primary_copy else "standby"
                if not copy["running"] or copy["role"] != wanted:
                    problems.append(f"{key}: {copy['role']} (running {copy['running']}), map says {wanted}")
                elif wanted == "standby" and not (copy["positions"] or {}).get("streaming"):
                    problems.append(f"{key}: standby not streaming")
                if not health.get(member.service_url):
                    problems.append(f"{key}: health check not passing")
            if not problems:
                return record
            assert time.monotonic() < deadline, f"{shard} not settled: {problems}"
            await asyncio.sleep(0.2)  # poll interval


async def restore_home(cluster: Cluster, shard: str) -> None:
    """Promote the shard's home copy back (a planned change: the home copy is the
    current primary's synchronous standby), then wait until every copy is settled."""
    record = await wait_copies_settled(cluster, shard)
    if record.primary_copy != HOME[shard]:
        code, out = await run_cli(cluster, "shard", "promote", shard, "--to", HOME[shard])
        print(out)
        assert code == 0, out
    record = await wait_copies_settled(cluster, shard)
    assert record.primary_copy == HOME[shard]


@dataclass
class Bookings:
    """What booking clients were answered: every confirmed booking (201, or 200 for a
    replayed one: booking id -> reference), the statuses seen, and when each came."""

    confirmed: dict[str, str] = field(default_factory=dict)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    confirmed_at: list[float] = field(default_factory=list)

    def since(self, moment: float) -> int:
        return sum(1 for t in self.confirmed_at if t > moment)


async def booker(session: aiohttp.ClientSession, url: str, event: dict[str, Any], stop: asyncio.Event,
                 seen: Bookings) -> None:
    """One client: book one ticket after another, each with its own reference."""
    tier = event["tiers"][0]["id"]
    while not stop.is_set():
        reference = f"promote-{uuid.uuid4().hex}"
        try:
            async with session.post(f"{url}/api/bookings", json={
                "eventId": event["id"], "clientReference": reference,
                "items": [{"ticketTierId": tier, "quantity": 1}],
            }, timeout=aiohttp.ClientTimeout(total=20)) as resp:
                body = await resp.json(content_type=None)
                seen.statuses[str(resp.status)] += 1
                if resp.status in (200, 201):  # 200: a retry the service answered as a replay
                    seen.confirmed[body["id"]] = reference
                    seen.confirmed_at.append(time.monotonic())
        except (aiohttp.ClientError, TimeoutError) as exc:
            seen.statuses[exc.__class__.__name__] += 1


async def wait_for(predicate, what: str, timeout: float = DEADLINE) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # poll interval


# --- acceptance 1: kill -9 of the primary under load, then promote ----------------------------

async def test_kill_primary_under_load_then_promote_loses_no_confirmed_booking(cluster: Cluster) -> None:
    before, _ = await read_shard(cluster, "shard-a")
    assert before.primary_copy == "east" and "east/b" in before.sync_standbys
    seen = Bookings()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        event = await create_event_doc(session, gateway_url(cluster, "east"), [100_000], shard="shard-a")
        clients = [asyncio.create_task(booker(session, gateway_url(cluster, region), event, stop, seen))
                   for region in ("east", "east", "east", "west", "west", "west")]
        try:
            await wait_for(lambda: len(seen.confirmed) >= 30, "bookings before the fault")

            primary = await agent_copy(cluster, "east", "shard-a")
            assert primary["role"] == "primary" and primary["pid"]
            os.kill(primary["pid"], signal.SIGKILL)
            killed_at = time.monotonic()

            code, out = await run_cli(cluster, "shard", "promote", "shard-a", "--to", "east/b", "--json")
            promoted_at = time.monotonic()
            assert code == 0, out
            report = json.loads(out)
            print(json.dumps(report, indent=2))
            assert report["outcome"] == "promoted" and report["newPrimary"] == "east/b"
            assert report["oldPrimary"] == "east" and report["newEpoch"] == before.epoch + 1
            assert [s["name"] for s in report["steps"]] == ["check", "catch-up", "sync-set", "repoint",
                                                           "commit", "promote"]

            after, _ = await read_shard(cluster, "shard-a")
            assert after.primary_copy == "east/b" and after.epoch == before.epoch + 1
            # FIRST 1: the old primary once it is back as a standby, else the other region
            assert after.sync_standbys == ("east", "west") and after.epoch_lsn == report["epochLsn"]

            # bookings resume on the new primary
            await wait_for(lambda: seen.since(promoted_at) >= 30, "bookings after the promotion")
            first_after = min(t for t in seen.confirmed_at if t > killed_at)
            print(f"201s: {len(seen.confirmed)}, statuses {dict(seen.statuses)}, promote took "
                  f"{promoted_at - killed_at:.2f}s after the kill, first 201 after the kill "
                  f"{first_after - killed_at:.2f}s after it")
        finally:
            stop.set()
            await asyncio.gather(*clients)

    new_primary = cluster.databases[("shard-a", "east/b")].dsn
    conn = await asyncpg.connect(new_primary)
    try:
        found = await conn.fetch("SELECT id::text, client_reference FROM bookings WHERE id = ANY($1::uuid[])",
                                 list(seen.confirmed))
    finally:
        await conn.close()
    assert {r["id"]: r["client_reference"] for r in found} == seen.confirmed, (
        f"{len(seen.confirmed) - len(found)} confirmed bookings are missing on the new primary")
    await check_invariants(new_primary, event["id"])

    # the old primary comes back as a (rewound) standby of the new one; map show is all ok
    record = await wait_copies_settled(cluster, "shard-a")
    assert record.primary_copy == "east/b"
    code, out = await run_cli(cluster, "map", "show")
    line = next(x for x in out.splitlines() if x.startswith("shard-a "))
    print(line)
    assert code == 0 and "east/b (ok)" in line and "east (ok)" in line and "west (ok)" in line

    await restore_home(cluster, "shard-a")


# --- refusal: a copy outside the synchronous set ------------------------------------------------

async def test_a_promotion_that_could_lose_bookings_is_refused_and_changes_nothing(
        cluster: Cluster) -> None:
    """shard-b's synchronous set is FIRST 1 (west/b, east): with west/b not heard from, a
    confirmed booking may be on west/b alone, so promoting east is refused without
    --force, by the CLI and the admin API, and nothing changes."""
    before, index = await read_shard(cluster, "shard-b")
    assert {"east", "west/b"} <= set(before.sync_standbys)
    await asyncio.to_thread(cluster.stop_copy, "shard-b", "west/b")
    try:
        code, out = await run_cli(cluster, "shard", "promote", "shard-b", "--to", "east", "--json")
        assert code == 1, out
        assert json.loads(out)["kind"] == "not-most-recent"

        async with aiohttp.ClientSession() as session:
            url = f"{gateway_url(cluster, 'east')}/admin/shards/shard-b/promote"
            async with session.post(url, json={"to": "east"}, headers=AUTH) as resp:
                problem = await resp.json(content_type=None)
                assert resp.status == 409, problem
                assert problem["type"].endswith("/not-most-recent") and problem["problems"]
            async with session.post(url, json={"to": "east"}) as resp:
                assert resp.status == 401
            async with session.post(url, json={"to": 7}, headers=AUTH) as resp:
                assert resp.status == 400
            async with session.post(url, json={"to": "north"}, headers=AUTH) as resp:
                assert resp.status == 400 and (await resp.json())["type"].endswith("/unknown-copy")
            async with session.post(f"{gateway_url(cluster, 'east')}/admin/shards/shard-z/promote",
                                    json={"to": "east"}, headers=AUTH) as resp:
                assert resp.status == 404
    finally:
        await asyncio.to_thread(cluster.start_copy, "shard-b", "west/b")

    after, after_index = await read_shard(cluster, "shard-b")
    assert (after, after_index) == (before, index)
    async with store_for(cluster) as store:
        with pytest.raises(NotFound):
            await store.read_journal(journal_id("shard-b"))
    copy = await agent_copy(cluster, "east", "shard-b")
    assert copy["role"] == "standby" and copy["epoch"] == before.epoch


# --- an interrupted promotion is finished by running it again ------------------------------------

class Interrupted(Exception):
    pass


async def test_a_promotion_interrupted_after_the_commit_point_is_finished(cluster: Cluster) -> None:
    before, _ = await read_shard(cluster, "shard-b")

    async def die_after_commit(step: str) -> None:
        if step == "commit":
            raise Interrupted(step)

    async with store_for(cluster) as store, NodeAgents(store, ADMIN_TOKEN) as agents:
        with pytest.raises(Interrupted):
            await promote(store, agents, "shard-b", "west/b", fault_hook=die_after_commit)
        doc, _ = await store.read_journal(journal_id("shard-b"))
    assert doc["phase"] == "committed" and doc["target"] == "west/b"
    committed, _ = await read_shard(cluster, "shard-b")
    assert committed.primary_copy == "west/b" and committed.epoch == before.epoch + 1
    candidate = await agent_copy(cluster, "west/b", "shard-b")
    assert candidate["role"] == "standby"  # committed in the map, not promoted yet

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway_url(cluster, 'east')}/admin/shards/shard-b/promote",
                                json={"to": "west/b"}, headers=AUTH,
                                timeout=aiohttp.ClientTimeout(total=180)) as resp:
            report = await resp.json(content_type=None)
            assert resp.status == 200, report
        print(json.dumps(report, indent=2))
        assert report["resumed"] == "finished" and report["outcome"] == "finished"
        assert report["newEpoch"] == before.epoch + 1 and [s["name"] for s in report["steps"]] == ["promote"]

        event = await create_event_doc(session, gateway_url(cluster, "west"), [10], shard="shard-b")
        async with session.post(f"{gateway_url(cluster, 'west')}/api/bookings", json={
            "eventId": event["id"], "clientReference": f"promote-{uuid.uuid4().hex}",
            "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}],
        }, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 201, await resp.text()

    async with store_for(cluster) as store:
        with pytest.raises(NotFound):
            await store.read_journal(journal_id("shard-b"))
    record = await wait_copies_settled(cluster, "shard-b")
    assert record.primary_copy == "west/b"
    await check_invariants(cluster.databases[("shard-b", "west/b")].dsn, event["id"])
    await restore_home(cluster, "shard-b")


# --- issue 16, class 1: a committed promotion whose target dies is overtaken ----------------------

async def test_a_committed_promotion_whose_target_died_is_overtaken_by_a_promotion_to_another_copy(
        cluster: Cluster) -> None:
    """`promote shard-b --to west/b` dies right after its commit point, and west/b's host is
    lost at that moment (its node agent frozen, its postmaster killed): the map names a
    copy that was never promoted, and the journal names it. A promotion to another copy
    (here the old primary, which holds every confirmed booking: west/b never wrote its
    epoch row, so nothing was confirmed under its epoch) overtakes it at the next epoch,
    and bookings succeed again. Before issue 16 it was refused `operation-in-progress`."""
    before = await wait_copies_settled(cluster, "shard-b")
    assert before.primary_copy == "west"
    target = await agent_copy(cluster, "west/b", "shard-b")
    agent = cluster.agents["west/b"]
    assert agent.pid is not None and target["pid"]

    async def lose_target_after_commit(step: str) -> None:
        if step == "commit":
            os.kill(agent.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            os.kill(target["pid"], signal.SIGKILL)
            raise Interrupted(step)

    try:
        async with store_for(cluster) as store, NodeAgents(store, ADMIN_TOKEN) as agents:
            with pytest.raises(Interrupted):
                await promote(store, agents, "shard-b", "west/b", fault_hook=lose_target_after_commit)
            doc, _ = await store.read_journal(journal_id("shard-b"))
        assert doc["phase"] == "committed" and doc["target"] == "west/b"
        stuck, _ = await read_shard(cluster, "shard-b")
        assert stuck.primary_copy == "west/b" and stuck.epoch == before.epoch + 1

        async def old_primary_demoted() -> bool:  # its agent follows the map: a standby now
            copy = await agent_copy(cluster, "west", "shard-b")
            return bool(copy["running"] and copy["role"] == "standby")
        await poll(old_primary_demoted, "the old primary demoted by its node agent")

        code, out = await run_cli(cluster, "shard", "promote", "shard-b", "--to", "west", "--json")
        print(out)
        assert code == 0, out
        report = json.loads(out)
        assert report["outcome"] == "promoted" and report["newPrimary"] == "west"
        assert report["oldPrimary"] == "west/b" and report["newEpoch"] == before.epoch + 2
        assert report["resumed"] == "overtaken"
        after, _ = await read_shard(cluster, "shard-b")
        assert after.primary_copy == "west" and after.epoch == before.epoch + 2
        async with store_for(cluster) as store:
            with pytest.raises(NotFound):
                await store.read_journal(journal_id("shard-b"))

        async with aiohttp.ClientSession() as session:  # writable again, the target still lost
            event = await create_event_doc(session, gateway_url(cluster, "east"), [10], shard="shard-b")
            async with session.post(f"{gateway_url(cluster, 'east')}/api/bookings", json={
                "eventId": event["id"], "clientReference": f"promote-{uuid.uuid4().hex}",
                "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}],
            }, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                assert resp.status == 201, await resp.text()
        await check_invariants(cluster.databases[("shard-b", "west")].dsn, event["id"])
    finally:
        os.kill(agent.pid, signal.SIGCONT)  # type: ignore[arg-type]  # the host comes back
    record = await wait_copies_settled(cluster, "shard-b")
    assert record.primary_copy == HOME["shard-b"]

