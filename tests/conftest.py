"""The test harness: real servers for the session, always torn down.

One Consul agent and one PostgreSQL primary with a streaming replica are
started per test session, on free ports, in a temporary directory owned by
the user the servers run as. Readiness is polled, never slept for. Every
process is stopped in the fixture's finalizer, and (belt and braces) each
child carries a parent-death signal, so even a runner killed with SIGKILL
leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.consul_agent import ConsulAgent
from deploy.postgres import PostgresServer
from deploy.procs import free_port


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
    agent = ConsulAgent(workdir / "consul" / "data", free_port())
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
