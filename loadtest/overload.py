"""Overload benchmark: the mixed scenario beyond what the machine holds, with load
shedding on and off (issue 6, acceptance 6; MISSION.md §6).

    .venv/bin/python -m loadtest.overload --users 1400 --seconds 30
    .venv/bin/python -m loadtest.overload --users 60 --seconds 5 --topology small.yaml   # a smoke run

For each mode it starts a fresh cluster of the topology (default: deploy/topology.yaml,
on OS-assigned ports, in a temporary state directory), drives `loadtest.run --scenario
mixed` against it, stops it, and then prints side by side, per endpoint and overall:
the p95 of the admitted requests (answered, and neither 429 nor 503), and the share
of 429 and of 503 answers (and of requests that got no answer at all).

- **shedding on**: the topology's gateway limits (`max_in_flight_*`, `*_queue_ms`,
  `*_lag_ms`), booking services with their defaults (`common.admission.SERVICE_DEFAULTS`);
  `--read-lag-ms` / `--booking-lag-ms` override the gateways' lag targets, and
  `--service-lag-ms READ,BOOKING` the booking services' (to try other targets);
- **shedding off**: in-flight limits and lag targets 0 (off) on gateways and booking
  services: every request waits in the event loop for its turn, as before issue 6.

locust runs on the same machine and its cores: its own scheduling delay is part of
every latency it reports, on and off alike.

The per-client booking rate limit is off in both: every locust user connects from
this machine's one address, so the limit would treat 1,400 users as one client and
refuse nearly every booking (tests/test_rate_limits.py covers it with distinct
addresses). docs/benchmarks.md puts the load this machine holds at ~700 users; the
default `--users 1400` is twice that. Both runs check the inventory invariants.
Exit code 0 when both runs completed and their invariants held.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from common.internal_auth import own_scrape_token, scrape_request
from deploy.cluster import Cluster
from deploy.topology import DEFAULT_TOPOLOGY, Topology, load_topology

REPO = Path(__file__).resolve().parent.parent
EXIT_INVARIANT = 3

# Booking-service shedding (flags of `python -m shard_service`, read from the environment
# the cluster's processes inherit).
SERVICE_LIMIT_ENV = ("BOXOFFICE_MAX_IN_FLIGHT_READS", "BOXOFFICE_MAX_IN_FLIGHT_BOOKINGS",
                     "BOXOFFICE_READ_LAG_MS", "BOXOFFICE_BOOKING_LAG_MS")
SHEDDING_OFF = {"max_in_flight_reads": 0, "max_in_flight_bookings": 0,
                "read_lag_ms": 0.0, "booking_lag_ms": 0.0}


@dataclasses.dataclass
class Mode:
    name: str
    sheds: bool

    def topology(self, base: Topology, overrides: dict[str, float]) -> Topology:
        gateway = dict(base.gateway, booking_rate_per_second=0.0)
        gateway.update(overrides if self.sheds else SHEDDING_OFF)
        return dataclasses.replace(base, gateway=gateway)

    def environment(self, service_lag_ms: tuple[float, float] | None) -> dict[str, str]:
        if not self.sheds:
            return dict.fromkeys(SERVICE_LIMIT_ENV, "0")
        if service_lag_ms is None:
            return {}
        return {"BOXOFFICE_READ_LAG_MS": str(service_lag_ms[0]),
                "BOXOFFICE_BOOKING_LAG_MS": str(service_lag_ms[1])}


MODES = {"on": Mode("shedding on", True), "off": Mode("shedding off", False)}


def say(text: str) -> None:
    print(text, flush=True)


def run_mode(mode: Mode, base: Topology, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A fresh cluster for this mode, the load test against it, the report."""
    state_dir = workdir / mode.name.replace(" ", "-")
    saved = {key: os.environ.get(key) for key in SERVICE_LIMIT_ENV}
    for key in SERVICE_LIMIT_ENV:
        os.environ.pop(key, None)
    environment = mode.environment(args.service_lag_ms)
    os.environ.update(environment)  # inherited by the cluster's booking services
    own_scrape_token()  # the cluster's processes take it; scrape() sends it
    topology = mode.topology(base, gateway_overrides(args))
    cluster = Cluster(topology, state_dir, base_port=None,
                      progress=say if args.verbose else lambda _: None)
    report_path = workdir / f"{mode.name.replace(' ', '-')}.json"
    try:
        say(f"{mode.name}: starting a {len(base.regions)} x {len(base.shards)} cluster ...")
        cluster.start()
        say(f"{mode.name}: {args.users} users for {args.seconds:g} s")
        cmd = [sys.executable, "-m", "loadtest.run", "--state-dir", str(state_dir),
               "--scenario", "mixed", "--users", str(args.users), "--seconds", str(args.seconds),
               "--report", str(report_path), "--progress-every", str(args.progress_every)]
        plan = cluster.plan
        assert plan is not None
        log_path = workdir / f"{mode.name.replace(' ', '-')}.log"
        with log_path.open("w") as log:  # a file, not a pipe: a full pipe would stall locust
            output = None if args.verbose else log
            load = subprocess.Popen(cmd, cwd=REPO, stdout=output, stderr=output, text=True)
            seen, probes = watch_processes(plan.metrics_urls(),
                                           [plan.gateway_url(r) for r in plan.gateway_ports], load,
                                           deadline=time.monotonic() + args.seconds + 600)
            load.wait()
        if not report_path.exists():
            raise RuntimeError(f"loadtest.run wrote no report (exit {load.returncode}): "
                               f"{log_path.read_text()[-800:]}")
        report = dict(json.loads(report_path.read_text()))
        report["processes"] = process_figures(plan.metrics_urls(), seen)
        report["probe"] = probe_figures(probes)
        report["shedding"] = {"gateway": {k: v for k, v in topology.gateway.items()
                                          if k in SHEDDING_OFF or k.endswith("_queue_ms")},
                              "serviceEnvironment": environment}
        return report
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def scrape(url: str) -> list[Any]:
    """The samples of one process's /metrics (none when it does not answer)."""
    try:
        with urllib.request.urlopen(scrape_request(url), timeout=2.0) as resp:
            text = resp.read().decode()
    except OSError:
        return []
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


WATCHED_GAUGES = {"lag": "boxoffice_event_loop_lag_seconds",
                  "inFlight": "boxoffice_admission_in_flight"}


def probe(gateway: str) -> tuple[int, float]:
    """One listing read through a gateway, on a new connection: (status, seconds)."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"{gateway}/api/events?limit=5", timeout=10.0) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        status = 0
    return status, time.monotonic() - started


def watch_processes(urls: dict[str, str], gateways: list[str], load: subprocess.Popen[str],
                    deadline: float) -> tuple[dict[str, dict[str, list[float]]], list[tuple[int, float]]]:
    """While the load runs, once a second: each process's event-loop lag and admitted
    requests in flight (all classes), and one probe read through each gateway from this
    process, outside locust (the samples include the ramp-up and the end)."""
    seen: dict[str, dict[str, list[float]]] = {name: {k: [] for k in WATCHED_GAUGES} for name in urls}
    probes: list[tuple[int, float]] = []
    while load.poll() is None and time.monotonic() < deadline:
        for name, url in urls.items():
            samples = scrape(url)
            for key, gauge in WATCHED_GAUGES.items():
                values = [s.value for s in samples if s.name == gauge]
                if values:
                    seen[name][key].append(sum(values))
        probes += [probe(gateway) for gateway in gateways]
        time.sleep(1.0)
    return seen, probes


def probe_figures(probes: list[tuple[int, float]]) -> dict[str, Any]:
    """The probe reads' p50 and p95 when answered 200, and their share of 503s."""
    ok = sorted(seconds for status, seconds in probes if status == 200)

    def pct(q: float) -> float | None:
        return round(ok[min(len(ok) - 1, int(q * len(ok)))] * 1000, 1) if ok else None

    shed = sum(1 for status, _ in probes if status == 503)
    return {"requests": len(probes), "p50Ms": pct(0.50), "p95Ms": pct(0.95),
            "share503": shed / len(probes) if probes else 0.0}


def process_figures(urls: dict[str, str], seen: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per process: what it shed, by class and reason, and its lag and in-flight
    requests while the load ran (median and max of the once-a-second readings)."""
    figures: dict[str, Any] = {}
    for name, url in urls.items():
        shed: dict[str, float] = {}
        for sample in scrape(url):
            if sample.name == "boxoffice_shed_total" and sample.value:
                key = f"{sample.labels.get('class')}/{sample.labels.get('reason', '-')}"
                shed[key] = shed.get(key, 0) + sample.value
        lag = seen.get(name, {}).get("lag") or [0.0]
        in_flight = seen.get(name, {}).get("inFlight") or [0.0]
        figures[name] = {"shed": shed, "lagMedianMs": round(statistics.median(lag) * 1000, 1),
                         "lagMaxMs": round(max(lag) * 1000, 1),
                         "inFlightMedian": statistics.median(in_flight), "inFlightMax": max(in_flight)}
    return figures


def gateway_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The gateway settings the on-run changes from the topology's (the lag targets)."""
    overrides = {"read_lag_ms": args.read_lag_ms, "booking_lag_ms": args.booking_lag_ms}
    return {key: value for key, value in overrides.items() if value is not None}


def _lag_pair(text: str) -> tuple[float, float]:
    read, _, booking = text.partition(",")
    try:
        pair = (float(read), float(booking))
    except ValueError:
        raise argparse.ArgumentTypeError("expected READ,BOOKING in milliseconds, e.g. 100,250") from None
    if min(pair) < 0:
        raise argparse.ArgumentTypeError("lag targets are >= 0 (0: off)")
    return pair


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _pct(value: float) -> str:
    return f"{value:.1%}"


def print_comparison(reports: dict[str, dict[str, Any]]) -> None:
    on, off = reports["on"], reports["off"]
    say("")
    say(f"mixed scenario, {on['users']} users, {on['seconds']} s measured each, "
        f"{on['cpuCount']} cores (per-client rate limit off in both runs: one source address)")
    say("p95 of admitted requests (ms) and shares of 429 / 503 / no answer, shedding on | off")
    header = (f"{'endpoint':<44} {'p95 on':>7} {'p95 off':>8} {'503 on':>7} {'503 off':>8} "
              f"{'429 on':>7} {'429 off':>8} {'none on':>8} {'none off':>9}")
    say(header)

    def row(label: str, a: dict[str, Any], b: dict[str, Any]) -> None:
        say(f"{label:<44} {_ms(a.get('p95AdmittedMs')):>7} {_ms(b.get('p95AdmittedMs')):>8} "
            f"{_pct(a.get('share503', 0)):>7} {_pct(b.get('share503', 0)):>8} "
            f"{_pct(a.get('share429', 0)):>7} {_pct(b.get('share429', 0)):>8} "
            f"{_pct(a.get('shareNoAnswer', 0)):>8} {_pct(b.get('shareNoAnswer', 0)):>9}")

    rows_on = {(e["method"], e["name"]): e for e in on["admission"]["endpoints"]}
    rows_off = {(e["method"], e["name"]): e for e in off["admission"]["endpoints"]}
    for key in sorted(set(rows_on) | set(rows_off), key=lambda k: (k[1], k[0])):
        row(f"{key[0]} {key[1]}", rows_on.get(key, {}), rows_off.get(key, {}))
    row("overall", on["admission"]["overall"], off["admission"]["overall"])
    for name, r in (("on", on), ("off", off)):
        for process, figures in sorted(r.get("processes", {}).items()):
            say(f"shedding {name:<3} {process:<24} loop lag median {figures['lagMedianMs']:g} ms, "
                f"max {figures['lagMaxMs']:g} ms; in flight median {figures['inFlightMedian']:g}, "
                f"max {figures['inFlightMax']:g}; shed {figures['shed'] or 'nothing'}")
    for name, r in (("on", on), ("off", off)):
        probe_doc = r.get("probe", {})
        say(f"shedding {name:<3} probe reads outside locust (one a second per gateway, new connection): "
            f"{probe_doc.get('requests', 0)} sent, p50 {_ms(probe_doc.get('p50Ms'))} ms, "
            f"p95 {_ms(probe_doc.get('p95Ms'))} ms of the answered, 503 {_pct(probe_doc.get('share503', 0))}")
    for name, r in (("on", on), ("off", off)):
        say(f"shedding {name:<3} settings: gateway {r.get('shedding', {}).get('gateway')}, "
            f"booking services' environment {r.get('shedding', {}).get('serviceEnvironment') or 'defaults'}")
    for name, r in (("on", on), ("off", off)):
        overall = r["admission"]["overall"]
        admitted_rps = overall["admitted"] / r["seconds"] if r["seconds"] else 0.0
        p95 = overall["p95AdmittedMs"]
        say(f"shedding {name:<3}: {r['totals']['rps']} req/s answered, {admitted_rps:.0f} req/s admitted; "
            f"p95 of admitted {_ms(p95)} ms (goal < 500: "
            f"{'met' if p95 is not None and p95 < 500 else 'MISSED'}); "
            f"invariants {'held' if r['invariants']['held'] else 'FAILED'}; "
            f"{r['outcomes'].get('booked', 0)} bookings made")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1400,
                   help="locust users (default 1400: twice the ~700 this 2-core machine holds)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per run")
    p.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY,
                   help="the cluster to start for each run (default deploy/topology.yaml)")
    p.add_argument("--read-lag-ms", type=float, metavar="MS",
                   help="the gateways' read lag target in the on-run (default: the topology's)")
    p.add_argument("--booking-lag-ms", type=float, metavar="MS",
                   help="the gateways' booking lag target in the on-run (default: the topology's)")
    p.add_argument("--service-lag-ms", type=_lag_pair, metavar="READ,BOOKING",
                   help="the booking services' lag targets in the on-run (default: theirs)")
    p.add_argument("--only", choices=sorted(MODES), help="run one mode only (no comparison)")
    p.add_argument("--report", type=Path, help="write both runs' reports as JSON to this file")
    p.add_argument("--progress-every", type=float, default=10.0)
    p.add_argument("--verbose", action="store_true", help="show cluster start-up and locust progress")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = load_topology(args.topology)
    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-overload-"))
    os.chmod(workdir, 0o755)  # the Postgres servers run as their own OS user
    reports: dict[str, dict[str, Any]] = {}
    try:
        for key in [args.only] if args.only else ["on", "off"]:
            reports[key] = run_mode(MODES[key], base, args, workdir)
            overall = reports[key]["admission"]["overall"]
            say(f"{MODES[key].name}: p95 of admitted {_ms(overall['p95AdmittedMs'])} ms, "
                f"503 {_pct(overall['share503'])}, 429 {_pct(overall['share429'])}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.report:
        args.report.write_text(json.dumps(reports, indent=2) + "\n")
    if len(reports) == 2:
        print_comparison(reports)
    return 0 if all(r["invariants"]["held"] for r in reports.values()) else EXIT_INVARIANT


if __name__ == "__main__":
    sys.exit(main())
