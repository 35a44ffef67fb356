"""The booking service's one write path (shard_service/write_path.py), issue 16 class 4:
a retried write that finds its work done does not answer success before the
synchronous standbys hold it.

A primary of the test's own with one synchronous standby (`FIRST 1 (standby)`) and a
booking service of its own. Each first attempt commits while the standby is stopped;
its synchronous wait is cancelled (pg_cancel_backend), so it is committed on the
primary only and answered 503 `not-confirmed`. The retry, sent while the standby is
still stopped, finds the work done: it must wait in the synchronous wait like any
commit (it is seen there, unanswered), and answer success only once the standby is
back. Before the fix such a retry changed nothing, so its commit had no transaction
id, wrote no commit record and waited for nothing: it answered success at once for a
write a failover could still lose (an event created again, a move's activation). A
replayed booking already waited (its tier row locks write WAL); it is checked too, so
that it keeps waiting whatever the locking does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.deadlines import DEADLINE_HEADER
from deploy.consul_agent import ConsulAgent
from deploy.postgres import PostgresServer
from deploy.procs import free_port
from deploy.services import ShardSpec
from region_map import Shard, ShardMember
from shard_service import schema
from tests.conftest import ADMIN_TOKEN
from tests.support import create_event
from tests.test_fencing import (
    OwnService,
    _booking,
    _db,
    _poll,
    _put_map,
    _wait_role,
    own_services,  # noqa: F401  (the fixture, used by name)
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PATIENT = {DEADLINE_HEADER: "30000"}  # a retry that waits for the standby to come back


async def _sync_waiters(dsn: str) -> list[int]:
    conn = await _db(dsn)
    try:
        return [r["pid"] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'")]
    finally:
        await conn.close()


async def _cancel_waits(dsn: str) -> None:
    conn = await _db(dsn)
    try:
        for pid in await _sync_waiters(dsn):
            await conn.fetchval("SELECT pg_cancel_backend($1)", pid)
    finally:
        await conn.close()


async def _send(s: aiohttp.ClientSession, url: str, body: Any,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with s.post(url, json=body, headers={**AUTH, **PATIENT, **(headers or {})}) as resp:
        return resp.status, await resp.json(content_type=None)


async def _first_attempt_only_local(primary: PostgresServer,
                                    attempt: Awaitable[tuple[int, dict[str, Any]]]) -> None:
    """`attempt` commits with the standby stopped; its wait is cancelled: 503."""
    task = asyncio.ensure_future(attempt)

    async def waiting() -> bool:
        return bool(await _sync_waiters(primary.dsn)) or task.done()

    await _poll("the first attempt to wait for the synchronous standby", waiting)
    assert not task.done(), task.result()
    await _cancel_waits(primary.dsn)
    status, doc = await task
    assert status == 503 and doc["type"].endswith("/not-confirmed"), doc


async def _retry_waits_for_the_standby(
        primary: PostgresServer, standby: PostgresServer,
        retry: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> tuple[int, dict[str, Any]]:
    """The retry, sent while the standby is still stopped, is seen waiting for it (not
    answered); once the standby is back it answers."""
    task = asyncio.ensure_future(retry())

    async def waiting_or_answered() -> bool:
        return bool(await _sync_waiters(primary.dsn)) or task.done()

    await _poll("the retry to wait for the standby (or answer)", waiting_or_answered)
    assert not task.done(), f"answered without the standby: {task.result()}"
    standby.start()
    answer = await asyncio.wait_for(task, 30)
    standby.stop()
    return answer


@pytest.mark.timeout(180)
async def test_a_retry_that_finds_its_work_done_waits_for_the_synchronous_standby(
        workdir: Path, consul_agent: ConsulAgent,
        own_services: Callable[..., OwnService]) -> None:  # noqa: F811
    base = workdir / f"retry-{uuid.uuid4().hex[:6]}"
    primary = PostgresServer("retry-primary", base / "primary", free_port(), durable=False)
    standby = PostgresServer("retry-standby", base / "standby", free_port(), durable=False)
    try:
        primary.init_primary()
        await schema.install(primary.dsn, with_sample_data=False)
        standby.init_replica(primary)
        assert await primary.set_sync_standbys([standby.name], "zone") == 'FIRST 1 ("retry-standby")'
        prefix = f"test-retry-{uuid.uuid4().hex[:8]}/"
        await _put_map(consul_agent, prefix, [Shard("shard-r", 1, "test-region", {
            "test-region": ShardMember("test-region", "http://127.0.0.1:9/s", primary.address),
            "test-region/b": ShardMember("test-region", "http://127.0.0.1:9/s", standby.address,
                                         zone="b"),
        }, sync_standbys=("test-region/b",))])
        svc = own_services([ShardSpec("shard-r", primary.dsn, "test-region")],
                           consul_agent.address, prefix)
        await _wait_role(svc.url, "primary")
        async with aiohttp.ClientSession() as s:
            ev = await create_event(s, svc.url, [10])  # confirmed: the standby is up
            standby.stop()

            # An event created again (same spec): 200 with the event, after the wait.
            spec = {"id": str(uuid.uuid4()), "name": "Retried", "venue": "Hall",
                    "startsAt": "2028-01-01T20:00:00Z",
                    "tiers": [{"id": str(uuid.uuid4()), "name": "GA", "priceCents": 100,
                               "capacity": 5}]}
            await _first_attempt_only_local(primary, _send(s, f"{svc.url}/admin/events", spec))
            status, doc = await _retry_waits_for_the_standby(
                primary, standby, lambda: _send(s, f"{svc.url}/admin/events", spec))
            assert status == 200 and doc["id"] == spec["id"], doc

            # A move's activation done already: answered `open` only after the wait.
            moving = str(uuid.uuid4())
            page = {"event": {"id": moving, "name": "Moving", "venue": "Hall",
                              "startsAt": "2028-02-01 20:00:00+00", "currency": "USD",
                              "createdAt": "2026-01-01 00:00:00+00"},
                    "tiers": [{"id": str(uuid.uuid4()), "name": "GA", "priceCents": 100,
                               "capacity": 5, "remaining": 5}],
                    "bookings": []}
            moves = f"{svc.url}/admin/moves/{moving}"
            standby.start()
            status, doc = await _send(s, f"{moves}/import", {
                "moveId": "mv-retry", "sourceShard": "shard-z", "page": page})
            assert status == 200 and doc["outcome"] == "imported", doc
            standby.stop()
            await _first_attempt_only_local(
                primary, _send(s, f"{moves}/activate", {"moveId": "mv-retry"}))
            status, doc = await _retry_waits_for_the_standby(
                primary, standby, lambda: _send(s, f"{moves}/activate", {"moveId": "mv-retry"}))
            assert status == 200 and doc["outcome"] == "open", doc

            # A booking replayed by its client reference: 200, the same booking, after it.
            request = _booking(ev.id, ev.tier_ids[0], quantity=2)
            await _first_attempt_only_local(primary, _send(s, f"{svc.url}/api/bookings", request))
            status, doc = await _retry_waits_for_the_standby(
                primary, standby, lambda: _send(s, f"{svc.url}/api/bookings", request))
            assert status == 200 and doc["status"] == "confirmed", doc
    finally:
        standby.remove()
        primary.remove()
