"""The harness itself: real servers, real replication, nothing left behind."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from deploy.consul_agent import ConsulAgent
from deploy.postgres import PostgresServer
from deploy.procs import free_port, run, wait_until


def _psql(dsn: str, sql: str) -> str:
    return run(["psql", "-X", "-qAt", "-d", dsn, "-c", sql]).strip()


def test_replica_streams_from_primary(pg_pair: tuple[PostgresServer, PostgresServer]) -> None:
    primary, replica = pg_pair
    assert _psql(replica.dsn, "SELECT pg_is_in_recovery()") == "t"
    state = _psql(primary.dsn, "SELECT state FROM pg_stat_replication")
    assert state == "streaming"


def test_consul_kv_round_trip(consul_agent: ConsulAgent) -> None:
    token = {"X-Consul-Token": consul_agent.management_token}  # ACLs on: deploy/consul_agent.py
    req = urllib.request.Request(f"{consul_agent.url}/v1/kv/harness/probe", data=b"hello", method="PUT",
                                 headers=token)
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.loads(resp.read()) is True
    req = urllib.request.Request(f"{consul_agent.url}/v1/kv/harness/probe?raw", headers=token)
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.read() == b"hello"


def test_servers_run_as_postgres_when_root(pg_pair: tuple[PostgresServer, PostgresServer]) -> None:
    primary, _ = pg_pair
    assert primary.process is not None and primary.process.pid is not None
    uid = os.stat(f"/proc/{primary.process.pid}").st_uid
    if os.geteuid() == 0:
        assert uid != 0
    else:
        assert uid == os.geteuid()


def test_stop_leaves_no_process(workdir: Path) -> None:
    server = PostgresServer("harness-stop", workdir / "pg-stop" / "data", free_port(), durable=False)
    server.init_primary()
    assert server.process is not None
    pid = server.process.pid
    server.stop()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), "postmaster gone", timeout=10)
    assert not server.accepting_connections()
    server.remove()
