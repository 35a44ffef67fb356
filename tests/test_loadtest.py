"""The load-test runner (`python -m loadtest.run`) against the real 2x2 test cluster.

Short runs, real processes, no mocks. The runner always runs as a subprocess:
importing locust monkeypatches the whole process with gevent, which must not leak
into this pytest session (this module never imports `loadtest`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from deploy.cluster import Cluster
from tests.support import create_event_doc

REPO = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_SETUP, EXIT_INVARIANT, EXIT_SLO = 0, 1, 3, 4


# The functional runs below check what the runner reports and exits with, not how fast
# this machine is (that is the benchmark in docs/benchmarks.md): their latency limit is
# one nobody misses, so the exit code reflects the invariants alone.
NO_LATENCY_LIMIT = ["--p95-ms", "60000"]


def run_loadtest(args: list[str], report: Path) -> tuple[int, dict[str, Any] | None, str]:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run", *args, "--report", str(report), "--progress-every", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    output = done.stdout + done.stderr
    doc = json.loads(report.read_text()) if report.exists() else None
    return done.returncode, doc, output


def explicit_target(cluster: Cluster) -> list[str]:
    """The cluster named flag by flag, as for a cluster without a cluster.json."""
    assert cluster.plan is not None
    args = ["--admin-token", cluster.admin_token]
    for region in cluster.topology.region_names:
        args += ["--gateway", cluster.plan.gateway_url(region)]
    for shard, home in cluster.topology.shards.items():
        args += ["--primary-dsn", f"{shard}={cluster.databases[(shard, home)].dsn}"]
    return args


def test_flash_sale_sells_the_hot_tier_out_exactly(cluster: Cluster, tmp_path: Path) -> None:
    # The cluster's own cluster.json (gateways, operator token, primaries) drives this run.
    rc, report, output = run_loadtest(
        ["--state-dir", str(cluster.state_dir), "--scenario", "flash-sale",
         "--users", "10", "--seconds", "5", "--hot-capacity", "60", *NO_LATENCY_LIMIT],
        tmp_path / "flash.json",
    )
    assert rc == EXIT_OK, output
    assert report is not None, output
    assert set(report["gateways"]) == {"east", "west"}
    assert report["totals"]["requests"] > 0 and report["totals"]["failures"] == 0
    assert report["outcomes"]["booked"] > 0
    assert report["outcomes"]["sold-out"] > 0  # 409s were answers, not failures
    hot = report["hotTier"]
    assert hot["soldOut"], hot
    assert (hot["capacity"], hot["sold"], hot["remaining"]) == (60, 60, 0)
    assert hot["clientTickets"] == 60  # every ticket sold was acknowledged to exactly one client
    invariants = report["invariants"]
    assert invariants["held"], invariants
    assert invariants["inventory"] == [] and invariants["duplicateReferences"] == []
    assert invariants["idempotency"]["duplicatesDisagreed"] == 0
    assert "sold out exactly to capacity" in output


def test_mixed_scenario_books_replays_cancels_and_keeps_the_invariants(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Every booking is replayed and cancelled, so both paths run in a 5 s test.
    rc, report, output = run_loadtest(
        [*explicit_target(cluster), "--scenario", "mixed", "--users", "10", "--seconds", "5",
         "--replay-probability", "1", "--cancel-probability", "1", *NO_LATENCY_LIMIT],
        tmp_path / "mixed.json",
    )
    assert rc == EXIT_OK, output
    assert report is not None, output
    by_endpoint = {f"{e['method']} {e['name']}": e for e in report["endpoints"]}
    for endpoint in ("GET /api/events", "GET /api/events/[id]", "GET /api/events/[id]/ticket-tiers",
                     "POST /api/bookings", "POST /api/bookings [replay]", "GET /api/bookings/[id]",
                     "POST /api/bookings/[id]/cancel"):
        assert by_endpoint[endpoint]["requests"] > 0, endpoint
    assert report["totals"]["failures"] == 0
    outcomes = report["outcomes"]
    assert outcomes["booked"] > 0
    assert outcomes["replay-same-booking"] == outcomes["booked"]
    assert outcomes["cancelled"] == outcomes["booked"]
    invariants = report["invariants"]
    assert invariants["held"], invariants
    assert invariants["ledger"]["acknowledged"] == outcomes["booked"]
    assert invariants["ledger"]["missing"] == [] and invariants["ledger"]["wrongStatus"] == []
    assert invariants["tiersChecked"] > 0


def test_a_missed_slo_has_its_own_exit_code(cluster: Cluster, tmp_path: Path) -> None:
    # No request answers in under 0.01 ms: the SLO is missed, the invariants still hold.
    rc, report, output = run_loadtest(
        [*explicit_target(cluster), "--scenario", "mixed", "--users", "4", "--seconds", "2",
         "--p95-ms", "0.01"],
        tmp_path / "slo.json",
    )
    assert rc == EXIT_SLO, output
    assert report is not None
    assert not report["slo"]["held"] and report["slo"]["slowEndpoints"]
    assert report["invariants"]["held"]


async def test_a_broken_inventory_fails_the_run_with_its_own_exit_code(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The invariant check is not vacuous: one ticket taken out of a tier behind the
    platform's back (remaining no longer matches capacity - sold) fails the run."""
    assert cluster.plan is not None
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, cluster.plan.gateway_url("east"), [5], shard="shard-a",
                                       token=cluster.admin_token)
    tier_id = event["tiers"][0]["id"]
    conn = await asyncpg.connect(cluster.databases[("shard-a", "east")].dsn)
    try:
        await conn.execute("UPDATE ticket_tiers SET remaining = remaining - 1 WHERE id = $1::uuid", tier_id)
        # The flash sale books only its own hot tier, so nothing else touches this one.
        rc, report, output = await asyncio.to_thread(
            run_loadtest,
            [*explicit_target(cluster), "--scenario", "flash-sale", "--users", "2", "--seconds", "1",
             "--hot-capacity", "5"],
            tmp_path / "broken.json",
        )
    finally:
        await conn.execute("UPDATE ticket_tiers SET remaining = remaining + 1 WHERE id = $1::uuid", tier_id)
        await conn.close()
    assert rc == EXIT_INVARIANT, output
    assert report is not None and not report["invariants"]["held"]
    broken = report["invariants"]["inventory"]
    assert [(b["tier_id"], b["capacity"], b["remaining"], b["sold"], b["shard"]) for b in broken] == [
        (tier_id, 5, 4, 0, "shard-a")
    ]
    assert "INVARIANT FAILED" in output


def test_without_a_cluster_it_says_so(tmp_path: Path) -> None:
    rc, report, output = run_loadtest(["--state-dir", str(tmp_path)], tmp_path / "none.json")
    assert rc == EXIT_SETUP
    assert report is None
    assert "no running cluster" in output
