"""The node agent on real processes: two agents (regions east and west) each own one copy
of a shard; roles come from a shard record the test writes into Consul (its own prefix).

The tests run in file order on one setup: API auth and input, roles, the epoch row,
restarts after kill -9, the synchronous-set and repoint primitives, then a failover
after which the old primary (killed with local-only commits) comes back rewound.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.consul_agent import ConsulAgent
from deploy.postgres import PostgresServer
from deploy.procs import ManagedProcess, chown_for_service, free_port
from region_map import ConsulMapStore, Shard, ShardMember
from tests.support import fetchval, poll

TOKEN = f"agent-test-{uuid.uuid4().hex}"
SHARD = "shard-n"
DEADLINE = 20.0
STAND_IN_SERVICE = [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"]


@dataclass
class Agent:
    region: str
    url: str
    process: ManagedProcess
    server: PostgresServer  # the copy it owns (the test only reads its address and data dir)


@dataclass
class Setup:
    store: ConsulMapStore
    agents: dict[str, Agent]
    http: aiohttp.ClientSession

    async def call(self, region: str, method: str, path: str, body: Any = None,
                   token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        async with self.http.request(method, f"{self.agents[region].url}{path}", data=data,
                                     headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def copy(self, region: str) -> dict[str, Any]:
        status, doc = await self.call(region, "GET", "/agent/copies")
        assert status == 200, doc
        return doc["copies"][0]






def shard_record(primary: str, epoch: int, servers: dict[str, PostgresServer]) -> Shard:
    return Shard(SHARD, epoch, primary, {
        r: ShardMember(r, f"http://127.0.0.1:1/{r}/shards/{SHARD}", s.address) for r, s in servers.items()
    })


@pytest.fixture(scope="module")
async def setup(consul_agent: ConsulAgent) -> AsyncIterator[Setup]:
    root = Path(tempfile.mkdtemp(prefix="boxoffice-agent-"))
    os.chmod(root, 0o755)
    chown_for_service(root)
    servers = {r: PostgresServer(f"{SHARD}-{r}", root / r / "data", free_port(), durable=False)
               for r in ("east", "west")}
    store = ConsulMapStore(port=consul_agent.http_port, prefix=f"test-agent-{uuid.uuid4().hex[:10]}/")
    agents: dict[str, Agent] = {}
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90))
    try:
        servers["east"].init_primary()
        servers["west"].init_replica(servers["east"])
        for server in servers.values():  # the agents take over from here
            server.stop()
        await store.put_shard(shard_record("east", 1, servers), 0)
        for region, server in servers.items():
            config = {
                "region": region,
                "log_dir": str(root / region / "logs"),
                "durable": False,
                "consul": {"host": "127.0.0.1", "port": consul_agent.http_port, "prefix": store.prefix},
                "copies": [{"shard": SHARD, "name": server.name, "data_dir": str(server.data_dir),
                            "port": server.port}],
                "service": {"argv": STAND_IN_SERVICE} if region == "east" else None,
                "postgres": server.credentials.to_json(),  # the roles' passwords
            }
            (root / f"{region}.json").write_text(json.dumps(config))
            port = free_port()
            proc = ManagedProcess(
                f"node_agent[{region}]",
                [sys.executable, "-m", "node_agent", "--region", region, "--port", str(port),
                 "--config", str(root / f"{region}.json")],
                root / f"agent-{region}.log", env={**os.environ, "BOXOFFICE_ADMIN_TOKEN": TOKEN},
            )
            proc.start()
            agents[region] = Agent(region, f"http://127.0.0.1:{port}", proc, server)
        s = Setup(store, agents, http)
        for region in agents:
            await poll(lambda r=region: _answers(s, r), f"agent {region} answering")  # type: ignore[misc]
        yield s
    finally:
        await http.close()
        for agent in agents.values():
            agent.process.signal(signal.SIGCONT)
            agent.process.stop(timeout=60)
        for server in servers.values():  # belt and braces: nothing may outlive the test
            server.stop_stray_postmaster()
        try:
            await store.delete_all()
        finally:
            await store.close()
        if not os.environ.get("BOXOFFICE_KEEP_TEST_DIR"):
            shutil.rmtree(root, ignore_errors=True)


async def _answers(s: Setup, region: str) -> bool:
    if not s.agents[region].process.running():
        raise AssertionError(f"agent {region} exited:\n{s.agents[region].process.log_tail()}")
    try:
        status, _ = await s.call(region, "GET", "/agent/copies")
    except aiohttp.ClientError:
        return False
    return status == 200


async def in_role(s: Setup, region: str, role: str, streaming: bool | None = None) -> dict[str, Any] | None:
    copy = await s.copy(region)
    if not copy["running"] or copy["role"] != role:
        return None
    if streaming is not None and copy["positions"]["streaming"] != streaming:
        return None
    return copy


async def test_the_api_is_for_the_operator_only_and_checks_its_input(setup: Setup) -> None:
    status, doc = await setup.call("east", "GET", "/agent/copies", token=None)
    assert status == 401 and doc["type"].endswith("/unauthenticated")
    status, doc = await setup.call("east", "POST", f"/agent/copies/{SHARD}/promote", token="wrong")
    assert status == 403 and doc["type"].endswith("/forbidden")
    status, doc = await setup.call("east", "POST", "/agent/copies/no-such-shard/promote")
    assert status == 404
    bad = [("epoch", {"epoch": -1}), ("epoch", {"epoch": "3"}), ("repoint", {"primary": "nowhere"}),
           ("sync", {"mode": "sometimes", "standbys": []}), ("sync", {"mode": "zone", "standbys": []}),
           ("rewind", [])]
    for path, body in bad:
        status, doc = await setup.call("east", "POST", f"/agent/copies/{SHARD}/{path}", body)
        assert status == 400, (path, body, doc)
        assert "127.0.0.1" not in json.dumps(doc)


async def test_each_copy_runs_in_the_role_the_map_gives_it(setup: Setup) -> None:
    primary = await poll(lambda: in_role(setup, "east", "primary"), "east primary")
    standby = await poll(lambda: in_role(setup, "west", "standby", streaming=True), "west streaming")
    assert isinstance(primary, dict) and isinstance(standby, dict)
    assert primary["mapRole"] == "primary" and standby["mapRole"] == "standby"
    assert standby["positions"]["sender"] == setup.agents["east"].server.address


async def test_the_epoch_row_is_never_lowered(setup: Setup) -> None:
    path = f"/agent/copies/{SHARD}/epoch"
    assert await setup.call("east", "POST", path, {"epoch": 1}) == (200, {"epoch": 1, "changed": True})
    assert await setup.call("east", "POST", path, {"epoch": 1}) == (200, {"epoch": 1, "changed": False})
    status, doc = await setup.call("east", "POST", path, {"epoch": 0})
    assert status == 409 and doc["type"].endswith("/epoch-lower") and doc["storedEpoch"] == 1
    status, doc = await setup.call("west", "POST", path, {"epoch": 1})
    assert status == 409 and doc["type"].endswith("/not-a-primary")
    await poll(lambda: _epoch_is(setup, "west", 1), "the epoch row replicated to the standby")


async def _epoch_is(setup: Setup, region: str, epoch: int) -> bool:
    return (await setup.copy(region))["epoch"] == epoch


async def test_a_killed_postmaster_is_started_again_in_its_role(setup: Setup) -> None:
    for region, role in (("east", "primary"), ("west", "standby")):
        before = await setup.copy(region)
        started = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        after = await poll(lambda r=region, role=role, pid=before["pid"]: _restarted(setup, r, role, pid),  # type: ignore[misc]
                           f"{region} back as {role}")
        print(f"{region}: postgres killed -> accepting connections as {role} again in "
              f"{time.monotonic() - started:.2f}s")
        assert isinstance(after, dict) and after["restarts"] > before["restarts"]
    await poll(lambda: in_role(setup, "west", "standby", streaming=True), "west streaming again")


async def _restarted(setup: Setup, region: str, role: str, old_pid: int) -> dict[str, Any] | None:
    copy = await in_role(setup, region, role)
    return copy if copy is not None and copy["pid"] != old_pid else None


async def test_a_killed_booking_service_is_started_again(setup: Setup) -> None:
    _, doc = await setup.call("east", "GET", "/agent/copies")
    before = doc["service"]
    assert before["running"]
    os.kill(before["pid"], signal.SIGKILL)

    async def restarted() -> bool:
        _, now = await setup.call("east", "GET", "/agent/copies")
        service = now["service"]
        return (service["running"] and service["pid"] != before["pid"]
                and service["restarts"] > before["restarts"])

    await poll(restarted, "booking service running again")


async def test_sync_set_and_repoint_primitives(setup: Setup) -> None:
    east, west = setup.agents["east"].server, setup.agents["west"].server
    status, doc = await setup.call("east", "POST", f"/agent/copies/{SHARD}/sync",
                                   {"standbys": [west.name], "mode": "zone"})
    assert status == 200 and doc["synchronousStandbyNames"] == f'FIRST 1 ("{west.name}")'
    await poll(lambda: fetchval(east, "SELECT sync_state = 'sync' FROM pg_stat_replication "
                                      "WHERE application_name = $1", west.name), "west synchronous")
    status, doc = await setup.call("east", "POST", f"/agent/copies/{SHARD}/sync", {"mode": "off"})
    assert status == 200 and doc["synchronousStandbyNames"] == ""
    # West already follows east: repointing there is a success that changes nothing.
    path = f"/agent/copies/{SHARD}/repoint"
    status, doc = await setup.call("west", "POST", path, {"primary": east.address})
    assert (status, doc["changed"]) == (200, False)
    status, doc = await setup.call("east", "POST", path, {"primary": west.address})
    assert status == 409 and doc["type"].endswith("/not-a-standby")


async def test_the_old_primary_comes_back_as_a_rewound_standby(setup: Setup) -> None:
    east, west = setup.agents["east"], setup.agents["west"]

    async def west_follows() -> bool:  # its agent started it (the fixture waits for the agents only)
        return (await setup.copy("west")).get("role") == "standby"

    await poll(west_follows, "west running as a standby")
    before = await setup.copy("east")
    pid = before["pid"]
    # East's agent is frozen (cut off), so nothing reacts while west is promoted.
    east.process.signal(signal.SIGSTOP)
    try:
        shard, index = await setup.store.read_shard(SHARD)
        await setup.store.put_shard(shard.with_primary("west"), index)
        status, doc = await setup.call("west", "POST", f"/agent/copies/{SHARD}/promote", {"epoch": 2})
        timings = {k: doc.pop(k, None) for k in ("promoteSeconds", "epochSeconds")}
        assert (status, doc) == (200, {"promoted": True, "epoch": 2, "epochChanged": True})
        assert all(isinstance(v, float) and v >= 0 for v in timings.values()), timings
        status, doc = await setup.call("west", "POST", f"/agent/copies/{SHARD}/promote", {"epoch": 2})
        doc = {k: v for k, v in doc.items() if not k.endswith("Seconds")}
        assert (status, doc) == (200, {"promoted": False, "epoch": 2, "epochChanged": False})
        # The old primary still takes writes that nobody else will ever see; then it dies.
        local_only = f"local-only-{uuid.uuid4().hex[:8]}"
        await fetchval(east.server, "CREATE TABLE IF NOT EXISTS agent_t (tag text PRIMARY KEY)")
        for n in range(20):
            await fetchval(east.server, "INSERT INTO agent_t VALUES ($1)", f"{local_only}-{n}")
        os.kill(pid, signal.SIGKILL)
    finally:
        east.process.signal(signal.SIGCONT)

    copy = await poll(lambda: in_role(setup, "east", "standby", streaming=True),
                      "the old primary streaming from the new one")
    assert isinstance(copy, dict)
    assert copy["positions"]["sender"] == west.server.address and copy["mapRole"] == "standby"
    # Restarted once, straight into its map role (the agent read the shard record afresh
    # before it would start a primary), rewound on the way.
    assert copy["restarts"] == before["restarts"] + 1
    assert copy["lastStart"] == {"role": "standby", "rewound": True, "rebuilt": False, "epoch": 2}
    assert copy["epoch"] == 2  # the new primary's epoch row, replicated
    assert not await fetchval(east.server, "SELECT to_regclass('agent_t') IS NOT NULL")  # rewound away
    await fetchval(west.server, "CREATE TABLE agent_after (tag text)")
    await poll(lambda: fetchval(east.server, "SELECT to_regclass('agent_after') IS NOT NULL"),
               "the rewound copy replays the new primary")
    new_primary = await setup.copy("west")
    assert new_primary["role"] == "primary" and new_primary["timeline"] == copy["timeline"]


async def test_a_running_primary_the_map_no_longer_names_is_demoted(setup: Setup) -> None:
    # Switch back: the map names east (epoch 3), east is promoted; west's agent sees its
    # running primary named by no map and demotes it into a rewound standby of east.
    shard, index = await setup.store.read_shard(SHARD)
    await setup.store.put_shard(shard.with_primary("east"), index)
    status, doc = await setup.call("east", "POST", f"/agent/copies/{SHARD}/promote", {"epoch": 3})
    assert (status, doc["promoted"]) == (200, True)
    copy = await poll(lambda: in_role(setup, "west", "standby", streaming=True), "west demoted, streaming")
    assert isinstance(copy, dict)
    assert copy["positions"]["sender"] == setup.agents["east"].server.address
    assert copy["lastStart"]["role"] == "standby"
    await poll(lambda: _epoch_is(setup, "west", 3), "west replays east's epoch row")


async def _conninfo_port(server: PostgresServer) -> int | None:
    """The port of the primary_conninfo a running standby follows (None: none)."""
    conninfo = str(await fetchval(server, "SELECT current_setting('primary_conninfo')"))
    port = next((p.split("=", 1)[1] for p in conninfo.split() if p.startswith("port=")), None)
    return int(port) if port is not None else None


async def _follows(setup: Setup, region: str, port: int) -> dict[str, Any] | None:
    copy = await setup.copy(region)
    if not copy["running"] or copy["role"] != "standby":
        return None
    return copy if await _conninfo_port(setup.agents[region].server) == port else None


async def test_a_standby_still_following_an_old_primary_is_repointed_to_the_maps(
        setup: Setup) -> None:
    """Issue 16, class 6. The map names a new primary (north, on a host that is not up:
    its address answers nothing) while the old primary, east, runs on as a primary: its
    agent is cut off (frozen), so nothing demotes it. West still streams from east, and
    could confirm east's commits that east's rewind would later discard: west's agent
    notices that its upstream is not the map's primary and repoints it there."""
    east = setup.agents["east"]
    copy = await poll(lambda: in_role(setup, "west", "standby", streaming=True), "west streaming")
    assert isinstance(copy, dict) and copy["positions"]["sender"] == east.server.address
    north_port = free_port()
    east.process.signal(signal.SIGSTOP)
    try:
        shard, index = await setup.store.read_shard(SHARD)
        north = ShardMember("north", f"http://127.0.0.1:1/north/shards/{SHARD}", f"127.0.0.1:{north_port}")
        await setup.store.put_shard(Shard(SHARD, shard.epoch + 1, "north",
                                          {**shard.members, "north": north}), index)
        started = time.monotonic()
        await poll(lambda: _follows(setup, "west", north_port), "west repointed to north", timeout=DEADLINE)
        print(f"west repointed to the map's primary {time.monotonic() - started:.2f}s after the map changed")
        assert not (await east.server.positions()).in_recovery  # still a primary: nothing demoted it
        assert (await setup.copy("west"))["positions"]["sender"] != east.server.address
    finally:
        # East is named primary again (a higher epoch) before its agent wakes up.
        shard, index = await setup.store.read_shard(SHARD)
        await setup.store.put_shard(Shard(SHARD, shard.epoch + 1, "east", {
            k: m for k, m in shard.members.items() if k != "north"}), index)
        east.process.signal(signal.SIGCONT)
    copy = await poll(lambda: in_role(setup, "west", "standby", streaming=True),
                      "west follows east again", timeout=DEADLINE)
    assert isinstance(copy, dict) and copy["positions"]["sender"] == east.server.address


async def test_a_standby_repointed_by_hand_elsewhere_is_repointed_to_the_maps_primary(
        setup: Setup) -> None:
    """Issue 16, class 6: someone points the standby at another address (ALTER SYSTEM, as
    a promotion that could not reach its agent leaves it pointing at the old primary,
    whose host is gone): it stops streaming; its agent repoints it to the map's primary."""
    east, west = setup.agents["east"], setup.agents["west"]
    gone = free_port()
    await west.server.alter_system({"primary_conninfo": west.server.primary_conninfo("127.0.0.1", gone)})
    await poll(lambda: _follows(setup, "west", east.server.port), "west repointed to east", timeout=DEADLINE)
    await poll(lambda: in_role(setup, "west", "standby", streaming=True), "west streams from east",
               timeout=DEADLINE)


async def test_stop_and_start_for_drills(setup: Setup) -> None:
    path = f"/agent/copies/{SHARD}"
    assert await setup.call("west", "POST", f"{path}/stop") == (200, {"running": False, "holdSeconds": 600.0})
    copy = await setup.copy("west")
    assert not copy["running"] and copy["operatorStopped"] and 0 < copy["stopHoldSeconds"] <= 600
    assert await setup.call("west", "POST", f"{path}/start") == (200, {"running": True})
    await poll(lambda: in_role(setup, "west", "standby", streaming=True), "west back as a standby")
    assert not (await setup.copy("west"))["operatorStopped"]


async def test_one_failing_copy_does_not_stop_the_supervision_of_the_others(
        setup: Setup, consul_agent: ConsulAgent) -> None:
    """Chaos drill: a copy whose reconciliation raises (here: its data directory is
    missing, and its shard's primary does not answer, so nothing can rebuild it) ended
    the agent's whole supervision round, so the other copies on that host were never
    started after an agent restart. A third agent (north) owns that broken copy, listed
    first, and a healthy standby of shard-n: the standby runs and streams, the broken
    copy's failures are counted and retried with a back-off."""
    east = setup.agents["east"].server
    await _east_primary(setup)
    root = east.data_dir.parent.parent
    north = PostgresServer(f"{SHARD}-north", root / "north" / "data", free_port(), durable=False)
    await asyncio.to_thread(north.init_replica, east)
    await asyncio.to_thread(north.stop)
    broken = Shard("shard-broken", 1, "east", {
        r: ShardMember(r, f"http://127.0.0.1:1/{r}/shards/shard-broken", f"127.0.0.1:{free_port()}")
        for r in ("east", "north")})
    await setup.store.put_shard(broken, 0)
    config = {
        "region": "north",
        "log_dir": str(root / "north" / "logs"),
        "durable": False,
        "consul": {"host": "127.0.0.1", "port": consul_agent.http_port, "prefix": setup.store.prefix},
        "copies": [
            {"shard": "shard-broken", "name": "shard-broken-north", "data_dir": str(root / "north" / "gone"),
             "port": free_port()},
            {"shard": SHARD, "name": north.name, "data_dir": str(north.data_dir), "port": north.port},
        ],
        "postgres": north.credentials.to_json(),
    }
    (root / "north.json").write_text(json.dumps(config))
    port = free_port()
    agent = ManagedProcess(
        "node_agent[north]",
        [sys.executable, "-m", "node_agent", "--region", "north", "--port", str(port),
         "--config", str(root / "north.json")],
        root / "agent-north.log", env={**os.environ, "BOXOFFICE_ADMIN_TOKEN": TOKEN},
    )
    setup.agents["north"] = Agent("north", f"http://127.0.0.1:{port}", agent, north)
    agent.start()
    try:
        await poll(lambda: _answers(setup, "north"), "agent north answering")

        async def copies() -> dict[str, dict[str, Any]]:
            _, doc = await setup.call("north", "GET", "/agent/copies")
            return {c["shard"]: c for c in doc["copies"]}

        async def standby_streaming() -> bool:
            copy = (await copies())[SHARD]
            return bool(copy["running"] and copy["role"] == "standby" and copy["positions"]["streaming"])

        await poll(standby_streaming, "north's healthy copy streaming despite the broken one",
                   timeout=DEADLINE)
        failing = (await copies())["shard-broken"]
        assert not failing["running"] and failing["failures"] >= 1 and failing["lastError"], failing
    finally:
        del setup.agents["north"]
        agent.stop(timeout=60)
        north.stop_stray_postmaster()


async def _east_primary(setup: Setup) -> dict[str, Any]:
    """East running as the map's primary. The repoint test above can leave it a standby
    the map names primary (its agent, woken, first saw the map naming north and demoted
    it): promoting it is the controller's job, done here by hand."""
    shard, _ = await setup.store.read_shard(SHARD)
    assert shard.primary_copy == "east"
    copy = await poll(lambda: _running(setup, "east"), "east running")
    assert isinstance(copy, dict)
    if copy["role"] != "primary":
        status, doc = await setup.call("east", "POST", f"/agent/copies/{SHARD}/promote",
                                       {"epoch": shard.epoch})
        assert status == 200, doc
    primary = await poll(lambda: in_role(setup, "east", "primary"), "east primary")
    assert isinstance(primary, dict)
    return primary


async def _running(setup: Setup, region: str) -> dict[str, Any] | None:
    copy = await setup.copy(region)
    return copy if copy["running"] and copy["role"] is not None else None


def _zero_wal(data_dir: Path) -> int:
    """Overwrite every WAL segment of a stopped server with zeros (as an interrupted
    pg_rewind can leave them: "invalid record length"); how many."""
    segments = [p for p in (data_dir / "pg_wal").iterdir()
                if len(p.name) == 24 and all(c in "0123456789ABCDEF" for c in p.name)]
    for segment in segments:
        size = segment.stat().st_size
        with segment.open("r+b") as f:
            f.write(b"\0" * size)
    return len(segments)


async def test_a_copy_whose_rewind_keeps_failing_is_rebuilt_from_a_base_backup(setup: Setup) -> None:
    """Chaos drill: a copy rewinding from the new primary had its links cut mid-rewind;
    every later pg_rewind failed ("could not read WAL record ... invalid record length")
    and it stayed down for the rest of the run. Here the old primary (east) diverges
    while west is promoted, is shut down, and its WAL is overwritten with zeros: every
    pg_rewind fails. After a bounded number of attempts its agent re-creates it from a
    base backup of the map's primary, and it streams again."""
    east, west = setup.agents["east"], setup.agents["west"]
    before = await _east_primary(setup)
    await poll(lambda: in_role(setup, "west", "standby", streaming=True), "west streaming")
    pidfile = east.server.data_dir / "postmaster.pid"
    east.process.signal(signal.SIGSTOP)
    try:
        shard, index = await setup.store.read_shard(SHARD)
        promoted = shard.with_primary("west")
        await setup.store.put_shard(promoted, index)
        status, doc = await setup.call("west", "POST", f"/agent/copies/{SHARD}/promote",
                                       {"epoch": promoted.epoch})
        assert status == 200 and doc["promoted"], doc
        await fetchval(east.server, "CREATE TABLE agent_diverged (tag text)")
        os.kill(before["pid"], signal.SIGINT)  # a fast, clean shutdown: no crash recovery
        await poll(lambda: _gone(pidfile), "east shut down")
        assert _zero_wal(east.server.data_dir) > 0
    finally:
        east.process.signal(signal.SIGCONT)
    started = time.monotonic()
    copy = await poll(lambda: in_role(setup, "east", "standby", streaming=True),
                      "east rebuilt and streaming from west", timeout=90)
    print(f"east streaming again {time.monotonic() - started:.2f}s after its agent resumed")
    assert isinstance(copy, dict)
    assert copy["positions"]["sender"] == west.server.address
    assert copy["lastStart"]["rebuilt"] is True and copy["rebuilds"] == before["rebuilds"] + 1
    assert not await fetchval(east.server, "SELECT to_regclass('agent_diverged') IS NOT NULL")
    await fetchval(west.server, "CREATE TABLE agent_after_rebuild (tag text)")
    await poll(lambda: fetchval(east.server, "SELECT to_regclass('agent_after_rebuild') IS NOT NULL"),
               "the rebuilt copy replays the new primary")


async def _gone(path: Path) -> bool:
    return not await asyncio.to_thread(path.exists)
