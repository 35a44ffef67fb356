"""Prometheus beside a real cluster (issue 11, acceptance 2), on a cluster of its own:
regions east and west, shard p-east homed in east (zone standby east/b), p-west homed in
west (west/b), sync zone, no failover controllers, `prometheus.enabled`.

- Prometheus, started by the cluster, finds every process through Consul and scrapes it:
  its targets API lists every metrics listener, all up;
- a replica's Postgres stopped: within 5 s (the acceptance's bound) Prometheus shows it
  down (its agent's `boxoffice_postgres_up`), not streaming from its primary
  (`boxoffice_replication_connected`, measured on the primary) and its booking service's
  role for it `unknown`;
- a planned switchover shows in the epoch and role metrics (booking services, agents,
  gateways' maps);
- the primary's host lost (its node agent SIGKILLed, with its servers and booking
  service) with no controller running: the shard-without-primary alert goes pending.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy import prometheus
from deploy.cluster import Cluster
from tests.conftest import own_cluster
from tests.test_promote import run_cli

TOPOLOGY = {
    "name": "test-prometheus",
    "regions": {"east": {"location": "East"}, "west": {"location": "West"}},
    "latency_ms": {"east/west": 5},
    "shards": {"p-east": {"home": "east"}, "p-west": {"home": "west"}},
    "postgres": {"durable": False},
    "gateway": {"booking_rate_per_second": 1000, "booking_burst": 1000},
    "prometheus": {"enabled": True},
}
METRICS_BOUND = 5.0  # acceptance 2: a stopped replica shows in the metrics within 5 s
DEADLINE = 60.0


@pytest.fixture(scope="module")
def prom_cluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "prometheus-cluster", TOPOLOGY) as c:
        yield c


def api(cluster: Cluster, path: str, **params: str) -> Any:
    """One Prometheus HTTP API call; its `data`."""
    assert cluster.prometheus is not None
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{cluster.prometheus.url}/api/v1/{path}{query}", timeout=5) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]


def values(cluster: Cluster, promql: str) -> dict[str, float]:
    """An instant query: {the series' labels as JSON: value}."""
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
            for r in api(cluster, "query", query=promql)["result"]}


def value(cluster: Cluster, promql: str) -> float | None:
    """The value of a query that selects at most one series (None: none)."""
    found = values(cluster, promql)
    assert len(found) <= 1, found
    return next(iter(found.values()), None)


async def until(check: Any, what: str, timeout: float = DEADLINE) -> float:
    """Poll `check()` (blocking, run in a thread) until it is truthy; the seconds it took."""
    started = time.monotonic()
    while not await asyncio.to_thread(check):
        assert time.monotonic() - started < timeout, f"timed out after {timeout:g}s waiting for {what}"
        await asyncio.sleep(0.1)  # poll interval
    return time.monotonic() - started


def expected_targets(cluster: Cluster) -> set[str]:
    assert cluster.plan is not None
    return {e.process for e in prometheus.endpoints(cluster.plan, cluster.controllers)}


async def test_prometheus_scrapes_every_process_it_finds_in_consul(prom_cluster: Cluster) -> None:
    wanted = expected_targets(prom_cluster)
    kinds = {name.split("-", 1)[0] for name in wanted}
    assert kinds == {"gateway", "shard_service", "node_agent"}  # no controllers on this cluster
    assert len(wanted) == 2 + 4 + 4  # 2 gateways; 4 hosts with a booking service and an agent each

    def all_up() -> bool:
        targets = api(prom_cluster, "targets", state="active")["activeTargets"]
        up = {t["labels"]["instance"] for t in targets if t["health"] == "up"}
        return {t["labels"]["instance"] for t in targets} == wanted and up == wanted

    took = await until(all_up, "every process listed in Prometheus's targets, all up")
    print(f"every target up {took:.1f}s after the test asked")
    # The rules are loaded and evaluated (nothing firing on a healthy cluster's shards).
    groups = api(prom_cluster, "rules")["groups"]
    assert {"boxoffice-platform-alerts", "boxoffice-slo-alerts"} <= {g["name"] for g in groups}
    assert await asyncio.to_thread(
        value, prom_cluster, 'count(boxoffice_shard_role{role="primary"} == 1)') == 2
    # A pool per copy (3 copies of each shard), a map per gateway, booking service and agent.
    counts = {'count(boxoffice_pool_max_connections)': 6,
              'count(boxoffice_map_index)': 2 + 4 + 4}
    for promql, wanted in counts.items():
        assert await asyncio.to_thread(value, prom_cluster, promql) == wanted, promql


async def test_a_stopped_replica_shows_in_the_lag_and_health_metrics_within_5s(
        prom_cluster: Cluster) -> None:
    shard, replica = "p-east", "west"
    up = f'boxoffice_postgres_up{{shard="{shard}",copy="{replica}"}}'
    connected = f'boxoffice_replication_connected{{shard="{shard}",standby="{replica}"}}'
    lag = f'boxoffice_replication_lag_bytes{{shard="{shard}",standby="{replica}",kind="replay"}}'
    role = f'boxoffice_shard_role{{shard="{shard}",copy="{replica}",role="unknown"}}'

    def healthy() -> bool:
        return (value(prom_cluster, up) == 1 and value(prom_cluster, connected) == 1
                and value(prom_cluster, lag) is not None and value(prom_cluster, role) == 0)

    await until(healthy, "the replica up, streaming, with a measured lag")
    await asyncio.to_thread(prom_cluster.stop_copy, shard, replica)
    try:
        def shown() -> bool:
            return (value(prom_cluster, up) == 0 and value(prom_cluster, connected) == 0
                    and value(prom_cluster, lag) is None and value(prom_cluster, role) == 1)

        took = await until(shown, "the stopped replica in Prometheus", timeout=METRICS_BOUND)
        print(f"stopped replica shown in Prometheus after {took:.2f}s")
    finally:
        await asyncio.to_thread(prom_cluster.start_copy, shard, replica)
    await until(healthy, "the replica streaming again")


async def test_a_switchover_shows_in_the_epoch_and_role_metrics(prom_cluster: Cluster) -> None:
    shard, old, new = "p-west", "west", "west/b"
    database_epoch = f'boxoffice_shard_epoch{{shard="{shard}",copy="%s",source="database"}}'
    before = await asyncio.to_thread(value, prom_cluster, database_epoch % old)
    assert before is not None
    code, out = await run_cli(prom_cluster, "shard", "switchover", shard, "--to", new, "--json")
    assert code == 0, out
    epoch = before + 1
    assert json.loads(out)["newEpoch"] == epoch

    def shown() -> bool:
        q = lambda promql: value(prom_cluster, promql)  # noqa: E731
        return (
            q(f'boxoffice_shard_role{{shard="{shard}",copy="{new}",role="primary"}}') == 1
            and q(f'boxoffice_shard_role{{shard="{shard}",copy="{old}",role="replica"}}') == 1
            and q(database_epoch % new) == epoch
            and q(f'boxoffice_postgres_role{{shard="{shard}",copy="{new}",role="primary"}}') == 1
            and q(f'boxoffice_postgres_role{{shard="{shard}",copy="{old}",role="standby"}}') == 1
            and q(f'boxoffice_postgres_epoch{{shard="{shard}",copy="{new}"}}') == epoch
            and set(values(prom_cluster, f'boxoffice_map_shard_epoch{{shard="{shard}"}}').values())
            == {epoch}
            and q(f'count(boxoffice_map_shard_epoch{{shard="{shard}"}})') == 2 + 4  # gateways, agents
        )

    took = await until(shown, "the switchover in the role and epoch metrics")
    print(f"switchover shown in Prometheus {took:.2f}s after it returned")
    code, out = await run_cli(prom_cluster, "shard", "switchover", shard, "--to", old, "--json")
    assert code == 0, out  # back home for the next test


async def test_a_shard_without_its_primary_makes_the_alert_pending(prom_cluster: Cluster) -> None:
    shard, home = "p-east", "east"

    def alerts() -> dict[str, str]:
        return {a["labels"].get("shard", ""): a["state"] for a in api(prom_cluster, "alerts")["alerts"]
                if a["labels"]["alertname"] == "ShardWithoutWritablePrimary"}

    def primary_everywhere() -> bool:
        return value(prom_cluster, 'count(boxoffice_shard_role{role="primary"} == 1)') == 2 \
            and value(prom_cluster, 'min(boxoffice_gateway_shard_primary_healthy)') == 1

    await until(primary_everywhere, "both shards with a primary every gateway can reach")
    # Silent while every shard has its primary: a pending state left by the previous
    # test's switchover clears at the rules' next evaluation (every second).
    await until(lambda: alerts() == {}, "ShardWithoutWritablePrimary silent for every shard")
    prom_cluster.agents[home].kill()  # the host is gone: its servers and service die with it
    took = await until(lambda: alerts().get(shard) in ("pending", "firing"),
                       "ShardWithoutWritablePrimary pending for the shard")
    print(f"alert {alerts()[shard]} {took:.2f}s after the primary's host was lost")
    assert shard in alerts() and "p-west" not in alerts()
