"""Gateway overhead: what the gateway adds over calling the booking service directly,
and how many cached reads/s one gateway process serves compared with nginx.

    .venv/bin/python -m benchmarks.gateway_overhead [--requests 2000] [--seconds 10]

Starts its own one-region, one-shard cluster (real Consul, Postgres, booking
service, gateway), then:
1. latency: the same read and the same booking sent alternately straight to
   the booking service and through the gateway, one at a time; prints median
   and p95 of each and the difference (the gateway's added latency);
2. cached reads: `wrk` against the gateway's cached `GET /api/events`, then
   against nginx serving the same JSON bytes from a file; prints both and the
   ratio. Both run as one worker process on this machine (nginx
   `worker_processes 1`, one gateway process), with the same wrk settings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from deploy.cluster import Cluster
from deploy.procs import ManagedProcess, free_port, port_open, wait_until
from deploy.topology import parse_topology

# One load generator is one client address, and the figure is capacity: the per-client
# booking limit and load shedding are off in this cluster (gateways by the topology, the
# booking services by their environment, which the node agents pass on).
UNPROTECTED_GATEWAY = {"booking_rate_per_second": 0, "max_in_flight_reads": 0,
                       "max_in_flight_bookings": 0, "read_lag_ms": 0, "booking_lag_ms": 0}
UNPROTECTED_SERVICE_ENV = {"BOXOFFICE_MAX_IN_FLIGHT_READS": "0", "BOXOFFICE_MAX_IN_FLIGHT_BOOKINGS": "0",
                           "BOXOFFICE_READ_LAG_MS": "0", "BOXOFFICE_BOOKING_LAG_MS": "0"}

TOPOLOGY = {
    "name": "bench-1x1",
    "regions": {"local": {"location": "here"}},
    "shards": {"shard-1": {"home": "local"}},
    "postgres": {"durable": False},
    "gateway": UNPROTECTED_GATEWAY,
}
TOKEN = "bench-operator-token-0123456789-abcdefghij"  # strong enough for common.auth


def say(line: str) -> None:
    print(line, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_latency(gateway: str, service: str, requests: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {k: [] for k in
                                      ("read-direct", "read-gateway", "book-direct", "book-gateway")}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gateway}/admin/events", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"name": "Bench", "venue": "Hall", "startsAt": "2027-01-01T20:00:00Z",
                                "tiers": [{"name": "GA", "priceCents": 100, "capacity": 1_000_000}]}) as r:
            event = await r.json()
            assert r.status == 201, event
        tier = event["tiers"][0]["id"]
        read_path = f"/api/events/{event['id']}/ticket-tiers"
        body = {"eventId": event["id"], "items": [{"ticketTierId": tier, "quantity": 1}]}

        async def timed(key: str, method: str, url: str, **kw: object) -> None:
            started = time.perf_counter()
            async with s.request(method, url, **kw) as resp:  # type: ignore[arg-type]
                await resp.read()
                assert resp.status < 300, (url, resp.status)
            timings[key].append((time.perf_counter() - started) * 1000)

        for n in range(requests + 50):
            warm = n < 50
            await timed("read-direct", "GET", service + read_path)
            await timed("read-gateway", "GET", gateway + read_path)
            if n % 4 == 0:
                await timed("book-direct", "POST", service + "/api/bookings", json=body)
                await timed("book-gateway", "POST", gateway + "/api/bookings", json=body)
            if warm:
                for v in timings.values():
                    v.clear()
            if n % 500 == 0 and not warm:
                say(f"  latency: {n}/{requests} requests")
    return timings


def wrk(url: str, seconds: int, connections: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def start_nginx(workdir: Path, body: bytes) -> tuple[ManagedProcess, str]:
    root = workdir / "nginx"
    (root / "html" / "api").mkdir(parents=True)
    (root / "html" / "api" / "events").write_bytes(body)
    for sub in ("tmp", "logs"):
        (root / sub).mkdir()
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
master_process off;
pid {root}/nginx.pid;
error_log {root}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp; uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root}/html;
        default_type application/json;
        keepalive_requests 1000000;
    }}
}}
""")
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = ManagedProcess("nginx", [nginx, "-c", str(conf), "-p", str(root)], root / "logs" / "out.log")
    proc.start()
    wait_until(lambda: port_open("127.0.0.1", port), "nginx", alive=proc.running)
    return proc, f"http://127.0.0.1:{port}/api/events"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-bench-"))
    os.chmod(workdir, 0o755)
    cluster = Cluster(parse_topology(TOPOLOGY), workdir / "cluster", admin_token=TOKEN, durable=False,
                      progress=say)
    nginx: ManagedProcess | None = None
    try:
        say("starting a 1-region, 1-shard cluster ...")
        os.environ.update(UNPROTECTED_SERVICE_ENV)  # inherited by the booking services
        cluster.start()
        assert cluster.plan is not None
        gateway = cluster.plan.gateway_url("local")
        service = f"{cluster.plan.service_url('local')}"

        say(f"latency: {args.requests} sequential reads (+ {args.requests // 4} bookings) each way ...")
        t = asyncio.run(measure_latency(gateway, service, args.requests))

        events_body = subprocess.run(["curl", "-s", f"{gateway}/api/events"], capture_output=True,
                                     check=True).stdout
        nginx, nginx_url = start_nginx(workdir, events_body)
        wrk(f"{gateway}/api/events", 2, args.connections)  # warm-up
        say(f"cached reads: wrk -t1 -c{args.connections} -d{args.seconds}s, gateway then nginx ...")
        gw_rps = wrk(f"{gateway}/api/events", args.seconds, args.connections)
        nginx_rps = wrk(nginx_url, args.seconds, args.connections)
    finally:
        if nginx is not None:
            nginx.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    say("")
    say(f"Gateway overhead ({os.cpu_count()} cores, everything on this machine)")
    say(f"{'':<26}{'direct p50':>11}{'gateway p50':>12}{'added p50':>11}"
        f"{'direct p95':>12}{'gateway p95':>12}{'added p95':>11}")
    for kind in ("read", "book"):
        d, g = t[f"{kind}-direct"], t[f"{kind}-gateway"]
        dm, gm, d95, g95 = statistics.median(d), statistics.median(g), pct(d, 0.95), pct(g, 0.95)
        label = "GET tiers (ms)" if kind == "read" else "POST booking (ms)"
        say(f"{label:<26}{dm:>11.2f}{gm:>12.2f}{gm - dm:>11.2f}{d95:>12.2f}{g95:>12.2f}{g95 - d95:>11.2f}")
    say(f"cached GET /api/events: gateway {gw_rps:,.0f} req/s, nginx {nginx_rps:,.0f} req/s, "
        f"ratio gateway/nginx = {gw_rps / nginx_rps:.2f}")


if __name__ == "__main__":
    main()
