"""The role primitives of deploy/postgres.py on real servers: synchronous set, promote,
repoint without a restart, and pg_rewind of a crashed old primary.

The tests share one small replication group (a primary, two streaming standbys) of their
own and run in file order: the synchronous set first, then a promotion, then the old
primary's return.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from deploy.postgres import PostgresServer, sync_standby_names
from deploy.procs import chown_for_service, free_port
from tests.support import fetchval, poll

DEADLINE = 20.0


@dataclass
class Group:
    old_primary: PostgresServer
    a: PostgresServer  # promoted in the second test
    b: PostgresServer  # repointed to `a`


@pytest.fixture(scope="module")
def group() -> Iterator[Group]:
    root = Path(tempfile.mkdtemp(prefix="boxoffice-roles-"))
    root.chmod(0o755)
    chown_for_service(root)
    servers = [PostgresServer(f"roles-{n}", root / n / "data", free_port(), durable=False)
               for n in ("p", "a", "b")]
    try:
        p, a, b = servers
        p.init_primary()
        a.init_replica(p)
        b.init_replica(p)
        yield Group(p, a, b)
    finally:
        for server in servers:
            server.stop()
        if not os.environ.get("BOXOFFICE_KEEP_TEST_DIR"):
            shutil.rmtree(root, ignore_errors=True)






async def streams_to(primary: PostgresServer, standby: PostgresServer) -> bool:
    state = await fetchval(primary, "SELECT state FROM pg_stat_replication WHERE application_name = $1",
                           standby.name)
    return state == "streaming"


async def has_row(server: PostgresServer, tag: str) -> bool:
    return bool(await fetchval(server, "SELECT count(*) FROM roles_t WHERE tag = $1", tag))


def test_sync_standby_names_values() -> None:
    assert sync_standby_names(["shard-1-east-b"], "zone") == 'FIRST 1 ("shard-1-east-b")'
    assert sync_standby_names(["b", "c"], "region") == 'ANY 1 ("b", "c")'
    assert sync_standby_names([], "off") == ""
    with pytest.raises(ValueError):
        sync_standby_names([], "zone")


async def test_a_commit_waits_for_the_synchronous_standby(group: Group) -> None:
    p, _, b = group.old_primary, group.a, group.b
    await fetchval(p, "CREATE TABLE roles_t (tag text PRIMARY KEY)")
    value = await p.set_sync_standbys([b.name], "zone")
    assert await fetchval(p, "SHOW synchronous_standby_names") == value
    await poll(lambda: fetchval(p, "SELECT bool_or(sync_state = 'sync') FROM pg_stat_replication"),
               "a synchronous standby")
    b.stop()
    b.wait_stopped()
    tag = f"unconfirmed-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(p.dsn, timeout=3)
    notices: list[str] = []
    conn.add_log_listener(lambda _c, msg: notices.append(str(msg)))
    try:
        insert = asyncio.ensure_future(conn.execute("INSERT INTO roles_t VALUES ($1)", tag))
        waiting = "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        await poll(lambda: fetchval(p, waiting), "a commit waiting for the synchronous standby")
        assert not insert.done()
        await fetchval(p, "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        await asyncio.wait_for(insert, DEADLINE)
        await poll(lambda: asyncio.sleep(0, notices), "the cancellation warning")
    finally:
        await conn.close()
    # Committed locally, never confirmed as replicated: the client only learns it from the warning.
    assert any("canceling wait for synchronous replication" in n for n in notices), notices
    assert await has_row(p, tag)
    # The standby back: commits are confirmed again; then replication goes asynchronous.
    b.start_as_standby(p.address)
    await poll(lambda: streams_to(p, b), "b streaming again")
    confirmed = f"confirmed-{uuid.uuid4().hex[:8]}"
    await asyncio.wait_for(fetchval(p, "INSERT INTO roles_t VALUES ($1)", confirmed), DEADLINE)
    assert await p.set_sync_standbys([], "off") == ""
    assert await fetchval(p, "SHOW synchronous_standby_names") == ""


async def test_promote_then_repoint_the_other_standby_without_a_restart(group: Group) -> None:
    p, a, b = group.old_primary, group.a, group.b
    tag = f"before-{uuid.uuid4().hex[:8]}"
    await fetchval(p, "INSERT INTO roles_t VALUES ($1)", tag)
    await poll(lambda: has_row(a, tag), "a replayed the row")
    await poll(lambda: has_row(b, tag), "b replayed the row")

    before = await a.positions()
    assert before.in_recovery and before.streaming and before.replay_lsn is not None
    assert await a.promote() is True
    assert await a.promote() is False  # idempotent: already a primary
    after = await a.positions()
    assert not after.in_recovery and after.timeline == (before.timeline or 0) + 1
    assert after.current_lsn is not None and after.flush_lsn is not None

    assert b.process is not None
    pid = b.process.pid
    assert await b.repoint(a.host, a.port) is True
    assert await b.repoint(a.host, a.port) is False  # idempotent
    await poll(lambda: streams_to(a, b), "b streaming from the promoted a")
    assert b.process.pid == pid and b.running()
    tag = f"after-{uuid.uuid4().hex[:8]}"
    await fetchval(a, "INSERT INTO roles_t VALUES ($1)", tag)
    await poll(lambda: has_row(b, tag), "b replays the new primary's writes")
    assert (await b.positions()).sender == a.address


async def test_a_crashed_old_primary_is_rewound_into_a_standby_of_the_new_one(group: Group) -> None:
    p, a = group.old_primary, group.a
    # The old primary still runs on its own (the promotion cut it off): commits there are local only.
    assert not (await p.positions()).in_recovery
    local_only = f"local-only-{uuid.uuid4().hex[:8]}"
    await fetchval(p, "INSERT INTO roles_t VALUES ($1)", local_only)
    for n in range(50):  # enough WAL that it cannot be a coincidence of positions
        await fetchval(p, "INSERT INTO roles_t VALUES ($1)", f"{local_only}-{n}")
    p.crash()
    p.wait_stopped()
    assert p.controldata()["Database cluster state"] == "in production"  # not shut down cleanly

    new_timeline = await a.timeline()
    assert p.rewind_needed(new_timeline)
    result = p.rewind(a.admin_dsn())
    assert result.crash_recovery and result.rewound, result.output
    p.start_as_standby(a.address)
    await poll(lambda: streams_to(a, p), "the old primary streams from the new one")
    assert (await p.positions()).in_recovery
    assert not await has_row(p, local_only)
    tag = f"new-{uuid.uuid4().hex[:8]}"
    await fetchval(a, "INSERT INTO roles_t VALUES ($1)", tag)
    await poll(lambda: has_row(p, tag), "the rewound standby replays the new primary")

    # A second rewind of a standby that follows correctly has nothing to do.
    p.stop()
    p.wait_stopped()
    assert not p.rewind_needed(await a.timeline())
    again = p.rewind(a.admin_dsn())
    assert not again.rewound and not again.crash_recovery
    p.start_as_standby(a.address)
    await poll(lambda: streams_to(a, p), "streaming again after the no-op rewind")
