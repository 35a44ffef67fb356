"""The flash-sale scenario before and after batched booking commits (issue 9, acceptance 5).

    .venv/bin/python -m loadtest.flash_sale_batching --users 300 --seconds 30 --hot-capacity 6000
    .venv/bin/python -m loadtest.flash_sale_batching --users 40 --seconds 5 --hot-capacity 300   # smoke

In one invocation, on the same machine: for batching off, then on, a fresh cluster
of one region with one shard (`hot`, durability `--sync`, default zone: a
synchronous standby in the region's second zone), its booking services started
with BOXOFFICE_BATCHING off or on (the node agents pass their environment on), and
`loadtest.run --scenario flash-sale` against it: every user hammers one fresh tier
of `--hot-capacity` tickets through the gateway. Then, side by side:

- p95 per endpoint over the measured window (after the ramp-up), as `loadtest.run`
  reports it, and p95 of the booking requests answered while the tier was selling
  (from the first user's start to the last 201);
- the time to sell out the hot tier, first booking to the last ticket sold: from
  the database (min and max `created_at` of the tier's confirmed bookings; that is
  each transaction's start, so a booking that queued on the tier's lock counts
  from before its wait) and from the clients (first to last 201 received);
- bookings/s over that time, the batch sizes the service sent (its
  `boxoffice_booking_batch_size` histogram), the load average (1 min) before and
  after each run, and the invariants `loadtest.run` checks.

One load generator is one client address: the per-client booking limit and load
shedding are off in both runs (benchmarks/hot_tier.py UNPROTECTED_GATEWAY and
UNPROTECTED_SERVICE_ENV), so the figures are the booking path's, not admission's.
Users start all at once (`--spawn-rate`, default `--users`): the sale opens with
the first of them. Exit code 0 when both runs completed and every invariant held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.hot_tier import UNPROTECTED_SERVICE_ENV, topology
from common.internal_auth import own_scrape_token, scrape_request
from deploy.cluster import Cluster
from deploy.topology import parse_topology
from shard_service.inventory import tier_sales

REPO = Path(__file__).resolve().parent.parent
EXIT_INVARIANT = 3
MODES = ("off", "on")  # before issue 9, then after
SHARD, REGION = "hot", "local"  # benchmarks.hot_tier.topology's names

def say(text: str) -> None:
    print(text, flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


async def sell_out(dsn: str, tier_id: str) -> dict[str, Any]:
    """The hot tier's confirmed bookings, and the span of their `created_at`."""
    conn = await asyncpg.connect(dsn)
    try:
        sales = await tier_sales(conn, tier_id)
    finally:
        await conn.close()
    seconds = sales.seconds
    return {"bookings": sales.bookings, "tickets": sales.tickets, "seconds": seconds,
            "bookingsPerSecond": round(sales.bookings / seconds, 1) if seconds else None}


def batch_sizes(metrics_url: str) -> dict[str, float]:
    """Batches the shard's service sent and the requests in them (0 with batching off)."""
    with urllib.request.urlopen(scrape_request(metrics_url), timeout=5.0) as resp:
        text = resp.read().decode()
    figures = {"batches": 0.0, "requests": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("shard") != SHARD:
                continue
            if sample.name == "boxoffice_booking_batch_size_count":
                figures["batches"] += sample.value
            elif sample.name == "boxoffice_booking_batch_size_sum":
                figures["requests"] += sample.value
    return figures


def run_mode(batching: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A fresh cluster with batching `batching`, the flash sale against it, the report."""
    state_dir = workdir / f"batching-{batching}"
    keys = ["BOXOFFICE_BATCHING", *UNPROTECTED_SERVICE_ENV]
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(UNPROTECTED_SERVICE_ENV, BOXOFFICE_BATCHING=batching)  # the services inherit it
    own_scrape_token()  # the cluster's processes take it; batch_sizes() sends it
    cluster = Cluster(parse_topology(topology(args.sync)), state_dir, base_port=None,
                      progress=say if args.verbose else lambda _: None)
    report_path, log_path = workdir / f"{batching}.json", workdir / f"{batching}.log"
    try:
        say(f"batching {batching}: starting a 1-region, 1-shard cluster (sync {args.sync}) ...")
        cluster.start()
        plan = cluster.plan
        assert plan is not None
        metrics_url = f"http://127.0.0.1:{plan.service_metrics_ports[REGION]}/metrics"
        load_before = load_average()
        say(f"batching {batching}: {args.users} users, {args.hot_capacity} tickets, "
            f"{args.seconds:g} s measured (load {load_before})")
        cmd = [sys.executable, "-m", "loadtest.run", "--state-dir", str(state_dir),
               "--scenario", "flash-sale", "--users", str(args.users), "--seconds", str(args.seconds),
               "--spawn-rate", str(args.spawn_rate or args.users), "--hot-capacity",
               str(args.hot_capacity), "--hot-shard", SHARD, "--report", str(report_path),
               "--progress-every", str(args.progress_every)]
        with log_path.open("w") as log:  # a file, not a pipe: a full pipe would stall locust
            output = None if args.verbose else log
            done = subprocess.run(cmd, cwd=REPO, stdout=output, stderr=output, check=False,
                                  timeout=args.seconds + 600)
        if not report_path.exists():
            raise RuntimeError(f"loadtest.run wrote no report (exit {done.returncode}): "
                               f"{log_path.read_text()[-800:]}")
        report = dict(json.loads(report_path.read_text()))
        report["loadAverage"] = {"before": load_before, "after": load_average()}
        report["batching"] = batching
        report["batches"] = batch_sizes(metrics_url)
        hot = report["hotTier"]
        report["database"] = asyncio.run(sell_out(cluster.databases[(SHARD, REGION)].dsn,
                                                  hot["tierId"]))
        return report
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_comparison(reports: dict[str, dict[str, Any]]) -> None:
    off, on = reports["off"], reports["on"]
    say("")
    say(f"flash sale, {off['users']} users, hot tier of {off['hotTier'].get('capacity')} tickets, "
        f"{off['seconds']} / {on['seconds']} s measured, {off['cpuCount']} cores; "
        "batching off | on (per-client limit and shedding off)")
    say(f"{'p95 per endpoint (ms), measured window':<52} {'off':>8} {'on':>8}")
    rows_off = {(e["method"], e["name"]): e for e in off["endpoints"]}
    rows_on = {(e["method"], e["name"]): e for e in on["endpoints"]}
    for key in sorted(set(rows_off) | set(rows_on), key=lambda k: (k[1], k[0])):
        say(f"  {key[0] + ' ' + key[1]:<50} {_num(rows_off.get(key, {}).get('p95Ms')):>8} "
            f"{_num(rows_on.get(key, {}).get('p95Ms')):>8}")

    def line(label: str, pick: Any, digits: int = 0) -> None:
        say(f"{label:<52} {_num(pick(off), digits):>8} {_num(pick(on), digits):>8}")

    def sale(r: dict[str, Any], key: str) -> Any:
        return (r.get("sale") or {}).get(key)

    say(f"{'hot tier sold out in the run':<52} "
        + " ".join(f"{'yes' if r['hotTier'].get('soldOut') else 'NO':>8}" for r in (off, on)))
    line("p95 of booking requests while selling (ms)", lambda r: sale(r, "p95DuringSaleMs"))
    line("sell-out, database created_at span (s)", lambda r: r["database"]["seconds"], 2)
    line("sell-out, clients: first to last 201 (s)", lambda r: sale(r, "sellOutSeconds"), 2)
    line("bookings/s (database span)", lambda r: r["database"]["bookingsPerSecond"])
    line("bookings/s (clients)", lambda r: sale(r, "bookingsPerSecond"))
    line("bookings made", lambda r: r["database"]["bookings"])
    line("tickets sold", lambda r: r["database"]["tickets"])
    line("requests/s (measured window)", lambda r: r["totals"]["rps"])
    line("failed requests", lambda r: r["totals"]["failures"])
    line("batches sent (whole run)", lambda r: r["batches"]["batches"])
    line("mean requests per batch (whole run)",
         lambda r: r["batches"]["requests"] / r["batches"]["batches"] if r["batches"]["batches"] else None, 1)
    line("load average (1 min) before", lambda r: r["loadAverage"]["before"], 2)
    line("load average (1 min) after", lambda r: r["loadAverage"]["after"], 2)
    for name, r in (("off", off), ("on", on)):
        h, i = r["hotTier"], r["invariants"]
        say(f"batching {name:<3}: sold {h.get('sold')} of {h.get('capacity')}, remaining "
            f"{h.get('remaining')}, tickets clients were told about {h.get('clientTickets')}"
            f" ({'sold out' if h.get('soldOut') else 'NOT sold out'}); invariants "
            f"{'held' if i['held'] else 'FAILED'} (sold + remaining = capacity, no reference on "
            f"two bookings, every acknowledged booking stored, duplicates "
            f"{i['idempotency']['duplicatesAgreed']} agreed / "
            f"{i['idempotency']['duplicatesDisagreed']} disagreed)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.flash_sale_batching", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per run")
    p.add_argument("--hot-capacity", type=int, default=6000, help="tickets of the hot tier")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    p.add_argument("--sync", choices=("zone", "region", "off"), default="zone",
                   help="the shard's durability (default zone, the topology's default)")
    p.add_argument("--report", type=Path, help="write both runs' reports as JSON to this file")
    p.add_argument("--progress-every", type=float, default=5.0)
    p.add_argument("--verbose", action="store_true", help="show cluster start-up and locust progress")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-flash-batching-"))
    os.chmod(workdir, 0o755)  # the Postgres servers run as their own OS user
    reports: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    try:
        for batching in MODES:
            reports[batching] = run_mode(batching, args, workdir)
            r = reports[batching]
            say(f"batching {batching}: sold out in {_num(r['database']['seconds'], 2)} s "
                f"(database), invariants {'held' if r['invariants']['held'] else 'FAILED'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.report:
        args.report.write_text(json.dumps(reports, indent=2) + "\n")
    print_comparison(reports)
    say(f"both runs took {time.monotonic() - started:.0f} s")
    return 0 if all(r["invariants"]["held"] for r in reports.values()) else EXIT_INVARIANT


if __name__ == "__main__":
    sys.exit(main())
