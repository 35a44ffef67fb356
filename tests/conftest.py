"""The test harness: real servers for the session, always torn down.

One Consul agent and one PostgreSQL primary with a streaming replica are
started per test session, on free ports, in a temporary directory owned by
the user the servers run as. Readiness is polled, never slept for. Every
process is stopped in the fixture's finalizer, and (belt and braces) each
child carries a parent-death signal, so even a runner killed with SIGKILL
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from common.connections import raise_fd_limit
from common.internal_auth import METRICS_TOKEN_ENV
from deploy.consul_agent import ConsulAgent, new_token
from deploy.postgres import PostgresServer
from deploy.procs import ManagedProcess, free_port

if TYPE_CHECKING:
    from deploy.cluster import Cluster

pytest_plugins = ("tests.browser",)  # the headless-browser fixtures: chromium, page, ...

# Figures a test measured (the fuzzer's case count, a move's pause), printed at the end of
# the run whatever pytest captured: a test takes the `figure` fixture and calls it with a
# line. The line travels in the test's report (`user_properties`: it reaches the process
# that prints the summary however the tests were run, and junit XML reports too).
FIGURES: list[str] = []
FIGURE = "boxoffice-figure"


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    def record(line: str) -> None:
        request.node.user_properties.append((FIGURE, line))
    return record


def pytest_configure(config: pytest.Config) -> None:
    # Every server the harness starts (Consul, PostgreSQL, our services) inherits this
    # process's descriptor limit; a user's default soft limit (often 1024, where root's
    # may be far higher) runs Consul and the flash-sale tests out of descriptors.
    raise_fd_limit()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":  # each phase's report carries them all: take one
        FIGURES.extend(str(v) for k, v in report.user_properties if k == FIGURE)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("figures measured by the tests")
        for line in FIGURES:
            terminalreporter.write_line(line)


# Consul runs with ACLs (deploy/consul_agent.py). Every Consul the tests start (the
# session's agent, every cluster's) has this management token, and this process sends
# it by default (region_map reads $BOXOFFICE_CONSUL_TOKEN), so tests read and write the
# map as the operator does; the processes a cluster starts get their own tokens
# (Cluster.component_env). tests/test_consul_acl.py shows what the others may not do.
CONSUL_TOKEN = os.environ.setdefault("BOXOFFICE_CONSUL_TOKEN", new_token())

# Every metrics listener wants the scrape token (common/internal_auth.py); each process
# the tests start inherits this one (a cluster hands it on: Cluster.metrics_token), and
# tests that read a /metrics send METRICS_AUTH.
METRICS_TOKEN = os.environ.setdefault(METRICS_TOKEN_ENV, secrets.token_urlsafe(32))
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@dataclass
class RunningService:
    url: str
    process: ManagedProcess
    database: PostgresServer


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="boxoffice-test-"))
    os.chmod(path, 0o755)
    yield path
    if os.environ.get("BOXOFFICE_KEEP_TEST_DIR"):
        print(f"test data kept in {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def consul_agent(workdir: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(workdir / "consul" / "data", free_port(), management_token=CONSUL_TOKEN)
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="session")
def pg_pair(workdir: Path) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A primary and one streaming replica of it."""
    primary = PostgresServer("shard-t-primary", workdir / "pg" / "primary", free_port(), durable=False)
    replica = PostgresServer("shard-t-replica", workdir / "pg" / "replica", free_port(), durable=False)
    try:
        primary.init_primary()
        replica.init_replica(primary)
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


# --- booking services on the shard -------------------------------------------

ADMIN_TOKEN = "test-operator-token-0123456789-abcdefgh"  # as strong as common.auth asks


@pytest.fixture(scope="session")
def shard_db(pg_pair: tuple[PostgresServer, PostgresServer]) -> PostgresServer:
    """The primary with the schema, booking functions and sample data installed
    (epoch row 1, the map's epoch below)."""
    import asyncio

    from shard_service import schema

    primary, _ = pg_pair
    from deploy.postgres import restrict_app_role

    asyncio.run(schema.install(primary.dsn, with_sample_data=True, epoch=1))
    asyncio.run(restrict_app_role(primary.dsn))
    return primary


@dataclass(frozen=True)
class ShardMap:
    """The region map the booking-service fixtures follow: shard "shard-t" at epoch 1,
    its primary copy `test-region` (pg_pair's primary) and the replica `test-region/b`
    (zone b, pg_pair's replica), under a prefix of its own in the session's Consul."""

    consul: str  # host:port
    prefix: str
    primary_port: int  # the booking services' ports, named in the map
    replica_port: int

    SHARD = "shard-t"
    PRIMARY = "test-region"
    REPLICA = "test-region/b"


@pytest.fixture(scope="session")
def shard_map(consul_agent: ConsulAgent, pg_pair: tuple[PostgresServer, PostgresServer]) -> ShardMap:
    import asyncio
    import uuid

    from region_map import ConsulMapStore, Region, Shard, ShardMember

    primary, replica = pg_pair
    shard_map = ShardMap(consul_agent.address, f"test-services-{uuid.uuid4().hex[:8]}/",
                         free_port(), free_port())

    def url(port: int) -> str:
        return f"http://127.0.0.1:{port}/shards/{ShardMap.SHARD}"

    shard = Shard(ShardMap.SHARD, 1, ShardMap.PRIMARY, {
        ShardMap.PRIMARY: ShardMember("test-region", url(shard_map.primary_port), primary.address),
        ShardMap.REPLICA: ShardMember("test-region", url(shard_map.replica_port), replica.address,
                                      zone="b"),
    })

    async def write() -> None:
        store = ConsulMapStore(port=consul_agent.http_port, prefix=shard_map.prefix)
        try:
            await store.put_region(Region("test-region", "http://127.0.0.1:9", "Test"), 0)
            await store.put_shard(shard, 0)
        finally:
            await store.close()

    asyncio.run(write())
    return shard_map


def service_passfile(workdir: Path, db: PostgresServer) -> Path:
    """The booking services' passfile for the session's servers (their role's password,
    0600 to the user the services run as): services get no password on their argv."""
    from deploy.postgres import APP_ROLE
    from deploy.procs import app_user, write_private

    path = workdir / "pgpass-services"
    write_private(path, db.credentials.passfile((APP_ROLE,)), owner=app_user())
    return path


@pytest.fixture(scope="session")
def booking_service(shard_db: PostgresServer, shard_map: ShardMap,
                    workdir: Path) -> Iterator[RunningService]:
    """The booking service of the shard's primary copy (`test-region` in the map)."""
    from deploy.services import ShardSpec, start_booking_service

    port = shard_map.primary_port
    spec = ShardSpec(ShardMap.SHARD, shard_db.app_dsn, ShardMap.PRIMARY)
    proc = start_booking_service(
        "test-region", port, [spec], workdir / "svc-primary.log", admin_token=ADMIN_TOKEN,
        consul=shard_map.consul, map_prefix=shard_map.prefix, passfile=service_passfile(workdir, shard_db),
    )
    try:
        wait_for_role(f"http://127.0.0.1:{port}", "primary")
        yield RunningService(f"http://127.0.0.1:{port}", proc, shard_db)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def replica_booking_service(
    pg_pair: tuple[PostgresServer, PostgresServer], shard_db: PostgresServer, shard_map: ShardMap,
    workdir: Path,
) -> Iterator[RunningService]:
    """The booking service of the shard's streaming replica (`test-region/b` in the map)."""
    from deploy.services import ShardSpec, start_booking_service

    _, replica = pg_pair
    port = shard_map.replica_port
    spec = ShardSpec(ShardMap.SHARD, replica.app_dsn, ShardMap.REPLICA)
    proc = start_booking_service("test-region", port, [spec], workdir / "svc-replica.log",
                                 admin_token=ADMIN_TOKEN, consul=shard_map.consul,
                                 map_prefix=shard_map.prefix, passfile=service_passfile(workdir, replica))
    try:
        wait_for_role(f"http://127.0.0.1:{port}", "replica")
        yield RunningService(f"http://127.0.0.1:{port}", proc, replica)
    finally:
        proc.stop()


def wait_for_role(url: str, role: str, timeout: float = 15.0) -> None:
    """Poll a single-shard booking service's /api/health until it derives `role`."""
    import json
    import urllib.request

    from deploy.procs import wait_until

    def has_role() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("role") == role)
        except (OSError, ValueError):
            return False

    wait_until(has_role, f"{url} in role {role}", timeout)


# --- a small multi-region cluster: 2 regions x 2 shards ------------------------

SMALL_TOPOLOGY = {
    "name": "test-2x2",
    "regions": {"east": {"location": "East"}, "west": {"location": "West"}},
    "latency_ms": {"east/west": 5},
    "shards": {"shard-a": {"home": "east"}, "shard-b": {"home": "west"}},
    "postgres": {"durable": False},
    # Room for a booking service restart and the breaker's next probe (the tests that
    # stop a home region's service); the default topology keeps 5 s.
    "gateway": {"write_retry_seconds": 10,
                # Tests send hundreds of bookings at once from 127.0.0.1: limits that
                # never bite here (tests/test_rate_limits.py starts gateways with tight ones).
                "booking_rate_per_second": 1000, "booking_burst": 1000,
                "max_in_flight_reads": 1000, "max_in_flight_bookings": 1000,
                # No shedding on the event loop's lag either: a slow CI machine running
                # a test's hundreds of clients on one core lags past 100 ms, and that
                # shedding is shown in tests/test_admission_logic.py.
                "read_lag_ms": 0, "booking_lag_ms": 0},
}


@contextlib.contextmanager
def own_cluster(workdir: Path, name: str, topology: dict[str, Any]) -> Iterator[Cluster]:
    """A cluster of real processes for a topology (free ports, fsync off, the test
    operator token), stopped whatever happens: the session's, or a test module's own."""
    from deploy.cluster import Cluster
    from deploy.topology import parse_topology

    c = Cluster(parse_topology(topology), workdir / name, base_port=None,
                admin_token=ADMIN_TOKEN, durable=False, consul_token=CONSUL_TOKEN)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def cluster(workdir: Path) -> Iterator[Cluster]:
    """Consul, 2 shards x 2 regions of Postgres (primary, zone standby, streaming
    replica), a node agent and booking service per host and a gateway per region."""
    with own_cluster(workdir, "cluster", SMALL_TOPOLOGY) as c:
        yield c
