"""Overload benchmark: the mixed scenario beyond what the machine holds, with load
shedding on and off (issue 6, acceptance 6; MISSION.md §6).

    .venv/bin/python -m loadtest.overload --users 1400 --seconds 30
    .venv/bin/python -m loadtest.overload --users 60 --seconds 5 --topology small.yaml   # a smoke run

For each mode it starts a fresh cluster of the topology (default: deploy/topology.yaml,
on OS-assigned ports, in a temporary state directory), drives `loadtest.run --scenario
mixed` against it, stops it, and then prints side by side, per endpoint and overall:
the p95 of the admitted requests (answered, and neither 429 nor 503), and the share
of 429 and of 503 answers (and of requests that got no answer at all).

- **shedding on**: the topology's gateway limits (`max_in_flight_*`, `*_queue_ms`),
  booking services with their defaults (`common.admission.SERVICE_DEFAULTS`);
- **shedding off**: in-flight limits 0 (no limit) on gateways and booking services:
  every request waits in the event loop for its turn, as before issue 6.

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
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from deploy.cluster import Cluster
from deploy.topology import DEFAULT_TOPOLOGY, Topology, load_topology

REPO = Path(__file__).resolve().parent.parent
EXIT_INVARIANT = 3

# Booking-service shedding (flags of `python -m shard_service`, read from the environment
# the cluster's processes inherit).
SERVICE_LIMIT_ENV = ("BOXOFFICE_MAX_IN_FLIGHT_READS", "BOXOFFICE_MAX_IN_FLIGHT_BOOKINGS")


@dataclasses.dataclass
class Mode:
    name: str
    sheds: bool

    def topology(self, base: Topology) -> Topology:
        gateway = dict(base.gateway, booking_rate_per_second=0.0)
        if not self.sheds:
            gateway.update(max_in_flight_reads=0, max_in_flight_bookings=0)
        return dataclasses.replace(base, gateway=gateway)

    def environment(self) -> dict[str, str]:
        return {} if self.sheds else dict.fromkeys(SERVICE_LIMIT_ENV, "0")


MODES = {"on": Mode("shedding on", True), "off": Mode("shedding off", False)}


def say(text: str) -> None:
    print(text, flush=True)


def run_mode(mode: Mode, base: Topology, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A fresh cluster for this mode, the load test against it, the report."""
    state_dir = workdir / mode.name.replace(" ", "-")
    saved = {key: os.environ.get(key) for key in SERVICE_LIMIT_ENV}
    for key in SERVICE_LIMIT_ENV:
        os.environ.pop(key, None)
    os.environ.update(mode.environment())  # inherited by the cluster's booking services
    cluster = Cluster(mode.topology(base), state_dir, base_port=None,
                      progress=say if args.verbose else lambda _: None)
    report_path = workdir / f"{mode.name.replace(' ', '-')}.json"
    try:
        say(f"{mode.name}: starting a {len(base.regions)} x {len(base.shards)} cluster ...")
        cluster.start()
        say(f"{mode.name}: {args.users} users for {args.seconds:g} s")
        cmd = [sys.executable, "-m", "loadtest.run", "--state-dir", str(state_dir),
               "--scenario", "mixed", "--users", str(args.users), "--seconds", str(args.seconds),
               "--report", str(report_path), "--progress-every", str(args.progress_every)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=not args.verbose, text=True, check=False,
                              timeout=args.seconds + 600)
        if not report_path.exists():
            raise RuntimeError(f"loadtest.run wrote no report (exit {done.returncode}): "
                               f"{(done.stderr or '')[-800:]}")
        return dict(json.loads(report_path.read_text()))
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
