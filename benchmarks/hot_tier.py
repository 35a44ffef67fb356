"""Hot tier: bookings/s through the gateway and through the booking service, against
pgbench sending the same SQL.

    .venv/bin/python -m benchmarks.hot_tier [--concurrency 16] [--seconds 10] [--rounds 2]
                                            [--sync zone|region|off] [--batching on|off]
                                            [--batch-max 64]

Every client books one ticket of the same tier (the worst case: every booking
serialises on one row lock). Same run, same machine, same concurrency, on a
one-region, one-shard cluster (real Consul, PostgreSQL 15 primary, booking
service, gateway):

- gateway: `wrk` posts `POST /api/bookings` to the region's gateway, which
  routes it to the shard's booking service (MISSION.md section 8's figure),
  which commits them in batches (shard_service/combiner.py) unless
  `--batching off`;
- service: the same requests straight to the booking service (aiohttp +
  asyncpg pool) beside the primary;
- pgbench: `pgbench -M prepared` sends today's one-booking-per-transaction
  statement (`shard_service.queries.BOOK`: `CALL boxoffice_book_committed(...)`,
  which books, commits and reads the commit position in one round trip), with
  the same argument shapes, a fresh client reference each time.

`--sync` sets the shard's durability (MISSION.md section 5): `zone` (the default)
confirms a booking once a synchronous standby in the home region's second zone
(1 ms away) has it; `region` once a replica in another region (35 ms away each
way, so a 70 ms round trip per commit) has it; `off` on the local commit alone.

Every request carries a fresh `clientReference`, as the booking page's do.
Rounds alternate (gateway, service, pgbench, ...) so drift hits all three.
Prints the rates, the ratios against pgbench (MISSION.md section 8 with
batching: gateway >= 2 x pgbench at c=64 durable, >= 1 x at c=16, >= 300
bookings/s with `--sync region`), latency percentiles, the batch sizes the
service sent (from its metrics), the machine's load average, and the inventory
invariant afterwards.
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
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from common.internal_auth import own_scrape_token, scrape_request
from deploy.cluster import Cluster
from deploy.postgres import DATABASE, SUPERUSER, pg_tool
from deploy.topology import parse_topology
from shard_service import queries
from shard_service.combiner import DEFAULT_MAX_SIZE
from shard_service.inventory import audit_inventory

FAR_MS = 35  # one way, to the other region of `--sync region`

# One load generator is one client address, and the figure is capacity: the per-client
# booking limit and load shedding are off in this cluster (gateways by the topology, the
# booking services by their environment, which the node agents pass on).
UNPROTECTED_GATEWAY = {"booking_rate_per_second": 0, "max_in_flight_reads": 0,
                       "max_in_flight_bookings": 0, "read_lag_ms": 0, "booking_lag_ms": 0}
UNPROTECTED_SERVICE_ENV = {"BOXOFFICE_MAX_IN_FLIGHT_READS": "0", "BOXOFFICE_MAX_IN_FLIGHT_BOOKINGS": "0",
                           "BOXOFFICE_READ_LAG_MS": "0", "BOXOFFICE_BOOKING_LAG_MS": "0"}


def topology(sync: str) -> dict[str, object]:
    """One region with the hot shard (and for `region` durability, a second region
    FAR_MS away holding the synchronous replica)."""
    regions: dict[str, object] = {"local": {"location": "here"}}
    doc: dict[str, object] = {"name": "bench-hot-tier", "regions": regions,
                              "shards": {"hot": {"home": "local", "sync": sync}},
                              "gateway": UNPROTECTED_GATEWAY}
    if sync == "region":
        regions["far"] = {"location": "elsewhere"}
        doc["latency_ms"] = {"local/far": FAR_MS}
    return doc
TOKEN = "bench-operator-token-0123456789-abcdefghij"  # strong enough for common.auth
CAPACITY = 1_000_000  # the operator API's maximum; far more than a run sells

# pgbench runs the service's own statement (`shard_service.queries.BOOK`), its
# parameters filled the way the service fills them: a new booking id, the event,
# a fresh client reference, one ticket of the hot tier, the SHA-256 of a fresh buyer's
# secret (as a gateway makes one for every booking that comes without).
PGBENCH_ARGUMENTS = {
    "$1": "gen_random_uuid()",
    "$2": ":event",
    "$3": "('pgbench-' || gen_random_uuid())",
    "$4": "ARRAY[:tier::uuid]",
    "$5": "ARRAY[1]",
    "$6": "sha256(convert_to(gen_random_uuid()::text, 'UTF8'))",
    "$7": "1",  # the shard's epoch: the benchmark's cluster never changes primary
}


def pgbench_script() -> str:
    statement = queries.BOOK.strip()
    for placeholder, value in PGBENCH_ARGUMENTS.items():
        statement = statement.replace(placeholder, value)
    assert "$" not in statement, statement
    return statement + ";\n"

# One fresh clientReference per request: run prefix, wrk thread, counter.
WRK_SCRIPT = """\
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local counter = 0
request = function()
  counter = counter + 1
  local body = string.format('%s', "%s-" .. tid .. "-" .. counter)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""


@dataclass(frozen=True)
class Target:
    """What the load goes to: the gateway, the service, or pgbench on the primary."""

    gateway: str
    service: str
    pg_port: int
    dsn: str


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


def run_wrk(url: str, body_template: str, workdir: Path, concurrency: int,
            seconds: int) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % (body_template, f"wrk-{uuid.uuid4().hex[:12]}"))
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


def run_pgbench(target: Target, event: str, tier: str, workdir: Path, concurrency: int,
                seconds: int) -> dict[str, float]:
    script = workdir / "book.sql"
    script.write_text(pgbench_script())
    out = subprocess.run(
        [pg_tool("pgbench"), "-n", "-M", "prepared", "-c", str(concurrency), "-j", "2",
         "-T", str(seconds), "-f", str(script), "-D", f"event={event}", "-D", f"tier={tier}",
         "-h", "127.0.0.1", "-p", str(target.pg_port), "-U", SUPERUSER, DATABASE],
        capture_output=True, text=True, check=True,
    ).stdout
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))  # type: ignore[union-attr]
    latency = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
    return {"rate": tps, "avg": latency}


async def invariant(dsn: str, event: str) -> tuple[int, int, int, bool]:
    conn = await asyncpg.connect(dsn)
    try:
        audit = await audit_inventory(conn, event_id=event)
    finally:
        await conn.close()
    (tier,) = audit.tiers
    return tier.capacity, tier.remaining, tier.sold, audit.held


BATCH_METRIC = re.compile(
    r'^boxoffice_booking_batch_size_(?P<kind>bucket|sum|count)\{(?:le="(?P<le>[^"]+)",)?shard="hot"'
    r'(?:,le="(?P<le2>[^"]+)")?\} (?P<value>[0-9.e+-]+)$', re.M)


@dataclass
class BatchSizes:
    """The service's batch-size histogram (cumulative buckets) at one moment."""

    count: float = 0.0
    total: float = 0.0
    buckets: dict[float, float] | None = None

    @classmethod
    def scrape(cls, metrics_url: str) -> BatchSizes:
        with urllib.request.urlopen(scrape_request(metrics_url), timeout=5) as resp:
            text = resp.read().decode()
        sizes = cls(buckets={})
        for m in BATCH_METRIC.finditer(text):
            value = float(m.group("value"))
            if m.group("kind") == "count":
                sizes.count = value
            elif m.group("kind") == "sum":
                sizes.total = value
            else:
                le = m.group("le") or m.group("le2")
                assert sizes.buckets is not None
                sizes.buckets[float("inf") if le == "+Inf" else float(le)] = value
        return sizes

    def since(self, before: BatchSizes) -> str:
        """Batches sent between two scrapes: how many, mean size, median and p90 bucket."""
        batches = self.count - before.count
        if batches <= 0:
            return "no batches"
        mean = (self.total - before.total) / batches
        assert self.buckets is not None and before.buckets is not None
        grown = sorted((le, n - before.buckets.get(le, 0.0)) for le, n in self.buckets.items())

        def quantile(q: float) -> str:
            le = next(le for le, n in grown if n >= q * batches)
            return f"<= {le:g}"

        return (f"{batches:,.0f} batches, mean {mean:.1f} bookings, "
                f"median {quantile(0.5)}, p90 {quantile(0.9)}")


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-fsync", action="store_true", help="fsync=off (default: durable)")
    parser.add_argument("--sync", choices=("zone", "region", "off"), default="zone",
                        help="the shard's synchronous replication (default zone)")
    parser.add_argument("--batching", choices=("on", "off"), default="on",
                        help="the booking service commits bookings in batches (default on)")
    parser.add_argument("--batch-max", type=int, default=DEFAULT_MAX_SIZE,
                        help=f"requests per batch at most (default {DEFAULT_MAX_SIZE})")
    args = parser.parse_args()
    # The cluster's booking services (started by its node agents) inherit these.
    os.environ["BOXOFFICE_BATCHING"] = args.batching
    os.environ["BOXOFFICE_BATCH_MAX"] = str(args.batch_max)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (scripts/install.sh installs it)")

    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-hot-tier-"))
    os.chmod(workdir, 0o755)
    mode = (("fsync off" if args.no_fsync else "durable") + f", sync {args.sync}, batching "
            + (f"on (max {args.batch_max})" if args.batching == "on" else "off"))
    own_scrape_token()  # the cluster (made next) takes it; BatchSizes.scrape sends it
    cluster = Cluster(parse_topology(topology(args.sync)), workdir / "cluster", admin_token=TOKEN,
                      durable=not args.no_fsync, progress=say)
    runs: dict[str, list[dict[str, float]]] = {"gateway": [], "service": [], "pgbench": []}
    batch_sizes: dict[str, list[str]] = {"gateway": [], "service": []}
    loads: list[str] = []
    try:
        say(f"starting a {len(cluster.topology.regions)}-region, 1-shard cluster (PostgreSQL {mode}) ...")
        os.environ.update(UNPROTECTED_SERVICE_ENV)  # inherited by the booking services
        cluster.start()
        assert cluster.plan is not None
        primary = cluster.databases[("hot", "local")]
        target = Target(cluster.plan.gateway_url("local"), cluster.plan.service_url("local"),
                        primary.port, primary.dsn)
        metrics_url = f"http://127.0.0.1:{cluster.plan.service_metrics_ports['local']}/metrics"
        event, tier = asyncio.run(create_hot_event(target.gateway))
        # wrk's script fills in the reference (the %s).
        body = json.dumps({"eventId": event, "items": [{"ticketTierId": tier, "quantity": 1}],
                           "clientReference": "%s"})

        def one(kind: str, seconds: int) -> dict[str, float]:
            if kind == "pgbench":
                return run_pgbench(target, event, tier, workdir, args.concurrency, seconds)
            url = target.gateway if kind == "gateway" else target.service
            return run_wrk(f"{url}/api/bookings", body, workdir, args.concurrency, seconds)

        say("warm-up ...")
        for kind in runs:
            one(kind, 2)
        for n in range(args.rounds):
            for kind, results in runs.items():
                before = BatchSizes.scrape(metrics_url)
                results.append(one(kind, args.seconds))
                r = results[-1]
                detail = (f"avg {r['avg']:.1f} ms" if kind == "pgbench"
                          else f"p50 {r['p50']:.1f} ms, non-2xx {r['non2xx']:.0f}")
                if kind in batch_sizes:
                    batch_sizes[kind].append(BatchSizes.scrape(metrics_url).since(before))
                    detail += f"; {batch_sizes[kind][-1]}"
                loads.append(load_average())
                say(f"  round {n + 1}: {kind} {r['rate']:,.0f} bookings/s ({detail}; "
                    f"load {loads[-1]})")
        capacity, remaining, sold, held = asyncio.run(invariant(target.dsn, event))
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    rate = {kind: statistics.mean(r["rate"] for r in results) for kind, results in runs.items()}
    say("")
    say(f"Hot tier, concurrency {args.concurrency}, PostgreSQL {mode}, {args.rounds} x "
        f"{args.seconds}s each, {os.cpu_count()} cores shared by load generator, gateway, "
        "service and Postgres")
    for kind, label in (("gateway", "wrk -> gateway -> booking service"),
                        ("service", "wrk -> booking service")):
        results = runs[kind]
        say(f"  {label:<36} {rate[kind]:>8,.0f} bookings/s, "
            f"p50 {statistics.mean(r['p50'] for r in results):.1f} ms, "
            f"p99 {statistics.mean(r['p99'] for r in results):.1f} ms")
    say(f"  {'pgbench, same SQL, -M prepared':<36} {rate['pgbench']:>8,.0f} bookings/s, "
        f"avg {statistics.mean(r['avg'] for r in runs['pgbench']):.1f} ms")
    target_ratio = "2.0 at c=64, 1.0 at c=16, durable" if args.batching == "on" else "0.50"
    say(f"  ratio gateway / pgbench = {rate['gateway'] / rate['pgbench']:.2f}  "
        f"(target >= {target_ratio})")
    say(f"  ratio service / pgbench = {rate['service'] / rate['pgbench']:.2f}")
    if args.sync == "region":
        say(f"  gateway with sync region: {rate['gateway']:,.0f} bookings/s (target >= 300)")
    for kind, sizes in batch_sizes.items():
        say(f"  batches ({kind} runs): " + " | ".join(sizes))
    say(f"  load average (1, 5, 15 min) after each run: {' / '.join(loads)}")
    say(f"  invariant: sold {sold:,} + remaining {remaining:,} = {sold + remaining:,} "
        f"(capacity {capacity:,}), no duplicate reference -> {'OK' if held else 'BROKEN'}")


if __name__ == "__main__":
    main()
