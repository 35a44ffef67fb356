"""Hot tier: bookings/s through the booking service vs pgbench calling the same SQL.

    .venv/bin/python -m benchmarks.hot_tier [--concurrency 16] [--seconds 10] [--rounds 2]

Every client books one ticket of the same tier (the worst case: every booking
serialises on one row lock). Same run, same machine, same concurrency:

- service: `wrk` posts `POST /api/bookings` to a booking service (aiohttp +
  asyncpg pool) on a real PostgreSQL 15 primary;
- pgbench: `pgbench -M prepared` sends the same `CALL boxoffice_book_committed(...)`
  the service sends (book, commit, read the commit position: one round trip),
  with the same argument shapes.

Rounds alternate (service, pgbench, service, ...) so drift hits both. Prints
both rates, their ratio (MISSION.md §8 target: service >= 0.5 x pgbench),
latency percentiles, and the inventory invariant afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import asyncpg

from deploy.postgres import PostgresServer, pg_tool
from deploy.procs import ManagedProcess, free_port
from deploy.services import ShardSpec, start_booking_service
from shard_service import schema

TOKEN = "bench-token"
CAPACITY = 1_000_000  # the operator API's maximum; far more than a run sells

PGBENCH_SCRIPT = """\
CALL boxoffice_book_committed(gen_random_uuid(), :event::uuid, NULL, ARRAY[:tier::uuid], ARRAY[1]);
"""

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%s'
"""


def say(line: str) -> None:
    print(line, flush=True)


async def create_hot_event(service_url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as s, s.post(
        f"{service_url}/admin/events", headers={"Authorization": f"Bearer {TOKEN}"},
        json={"name": "Flash sale", "venue": "Arena", "startsAt": "2027-01-01T20:00:00Z",
              "tiers": [{"name": "GA", "priceCents": 5000, "capacity": CAPACITY}]},
    ) as resp:
        doc = await resp.json()
        assert resp.status == 201, doc
    return doc["id"], doc["tiers"][0]["id"]


def run_wrk(url: str, body: str, workdir: Path, concurrency: int, seconds: int) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % body)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    duration = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert m, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    ok = total - (int(bad.group(1)) if bad else 0)
    return {"rate": ok / duration, "non2xx": total - ok, "p50": pct("50"), "p99": pct("99"),
            "socket_errors": 1.0 if errors else 0.0}


def run_pgbench(server: PostgresServer, event: str, tier: str, workdir: Path, concurrency: int,
                seconds: int) -> dict[str, float]:
    script = workdir / "book.sql"
    script.write_text(PGBENCH_SCRIPT)
    out = subprocess.run(
        [pg_tool("pgbench"), "-n", "-M", "prepared", "-c", str(concurrency), "-j", "2",
         "-T", str(seconds), "-f", str(script), "-D", f"event={event}", "-D", f"tier={tier}",
         "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", "boxoffice"],
        capture_output=True, text=True, check=True,
    ).stdout
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))  # type: ignore[union-attr]
    latency = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
    return {"rate": tps, "avg": latency}


async def invariant(dsn: str, tier: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT t.capacity, t.remaining,
                      coalesce((SELECT sum(quantity) FROM booking_items WHERE ticket_tier_id = t.id), 0)
               FROM ticket_tiers t WHERE t.id = $1::uuid""", tier)
        return int(row[0]), int(row[1]), int(row[2])
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pool", type=int, default=None, help="service pool size (default: concurrency)")
    parser.add_argument("--no-fsync", action="store_true", help="fsync=off (default: durable)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (scripts/install.sh installs it)")

    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-hot-tier-"))
    os.chmod(workdir, 0o755)
    server = PostgresServer("hot-tier", workdir / "pg", free_port(), durable=not args.no_fsync)
    service: ManagedProcess | None = None
    try:
        mode = 'fsync off' if args.no_fsync else 'durable'
        say(f"starting PostgreSQL 15 ({mode}) and a booking service ...")
        server.init_primary()
        asyncio.run(schema.install(server.dsn, with_sample_data=False))
        port = free_port()
        pool = args.pool or args.concurrency
        service = start_booking_service(
            "bench", port, [ShardSpec("hot", server.dsn, "primary", "bench", pool_size=pool)],
            workdir / "service.log", admin_token=TOKEN,
        )
        url = f"http://127.0.0.1:{port}"
        event, tier = asyncio.run(create_hot_event(url))
        body = json.dumps({"eventId": event, "items": [{"ticketTierId": tier, "quantity": 1}]})

        say("warm-up ...")
        run_wrk(f"{url}/api/bookings", body, workdir, args.concurrency, 2)
        run_pgbench(server, event, tier, workdir, args.concurrency, 2)

        svc_runs: list[dict[str, float]] = []
        pg_runs: list[dict[str, float]] = []
        for n in range(args.rounds):
            svc_runs.append(run_wrk(f"{url}/api/bookings", body, workdir, args.concurrency, args.seconds))
            say(f"  round {n + 1}: service {svc_runs[-1]['rate']:,.0f} bookings/s "
                f"(p50 {svc_runs[-1]['p50']:.1f} ms, non-2xx {svc_runs[-1]['non2xx']:.0f})")
            pg_runs.append(run_pgbench(server, event, tier, workdir, args.concurrency, args.seconds))
            say(f"  round {n + 1}: pgbench {pg_runs[-1]['rate']:,.0f} tps "
                f"(avg {pg_runs[-1]['avg']:.1f} ms)")
        capacity, remaining, sold = asyncio.run(invariant(server.dsn, tier))
    finally:
        if service is not None:
            service.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    svc = statistics.mean(r["rate"] for r in svc_runs)
    pgb = statistics.mean(r["rate"] for r in pg_runs)
    say("")
    say(f"Hot tier, concurrency {args.concurrency}, {args.rounds} x {args.seconds}s each, "
        f"{os.cpu_count()} cores shared by load generator, service and Postgres")
    say(f"  booking service (wrk -> aiohttp -> asyncpg pool of {pool}): {svc:,.0f} bookings/s, "
        f"p50 {statistics.mean(r['p50'] for r in svc_runs):.1f} ms, "
        f"p99 {statistics.mean(r['p99'] for r in svc_runs):.1f} ms")
    say(f"  pgbench (same SQL, -M prepared):                    {pgb:,.0f} bookings/s, "
        f"avg {statistics.mean(r['avg'] for r in pg_runs):.1f} ms")
    say(f"  ratio service / pgbench = {svc / pgb:.2f}  (target >= 0.50)")
    say(f"  invariant: sold {sold:,} + remaining {remaining:,} = {sold + remaining:,} "
        f"(capacity {capacity:,}) -> {'OK' if sold + remaining == capacity else 'BROKEN'}")


if __name__ == "__main__":
    main()
