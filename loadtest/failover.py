"""Failover during load: the mixed locust scenario with one failover drill in its middle.

    .venv/bin/python -m loadtest.failover [--state-dir DIR] [--users 50] [--seconds 60]
        [--shard shard-1] [--kind kill-primary] [--manual] [--report out.json]

Against the cluster `boxoffice up` runs (its cluster.json; the `up` process restarts
the host the drill kills). The locust run (`loadtest.run --scenario mixed`, in a process
of its own: locust patches its process with gevent) starts first; a third of the way in
the drill (failover/drill.py) adds its own booking clients, causes the fault, waits for
the failover and for full strength, and audits its bookings. Printed: the drill's
report, then the locust run's summary (per-endpoint p95 against the SLO, failures, and
its inventory invariants, which cover the whole run across the failover).

Exit code: 0 when the drill lost, oversold and duplicated nothing and the locust run's
invariants held (its SLO verdict is printed, not required: a failover pauses writes);
1 when the drill or the run could not start; 3 when something was lost or an invariant
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from deploy.cli import _read_state, default_state_dir
from failover.drill import KINDS, DrillCluster, DrillError, DrillSettings, format_report, run_drill

EXIT_INVARIANT = 3  # loadtest.run's code for a failed invariant
EXIT_SLO = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", type=Path, default=default_state_dir())
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0, help="the locust run's length")
    p.add_argument("--shard", default="shard-1")
    p.add_argument("--kind", choices=KINDS, default="kill-primary")
    p.add_argument("--manual", action="store_true")
    p.add_argument("--report", type=Path, help="write {drill, load} as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = _read_state(args.state_dir)
    if not state:
        print(f"loadtest.failover: no cluster.json in {args.state_dir} (`boxoffice up` first)",
              file=sys.stderr)
        return 1
    load_report = args.state_dir / f"failover-load-{int(time.time())}.json"
    locust = subprocess.Popen(
        [sys.executable, "-m", "loadtest.run", "--scenario", "mixed", "--users", str(args.users),
         "--seconds", str(args.seconds), "--state-dir", str(args.state_dir),
         "--report", str(load_report), "--progress-every", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    started = time.monotonic()
    report = None
    try:
        # A third of the run before the fault: the locust users are all spawned and booking.
        while time.monotonic() - started < args.seconds / 3 and locust.poll() is None:
            time.sleep(0.2)  # the load's own pace, not a synchronisation
        if locust.poll() is not None:
            print(locust.stdout.read() if locust.stdout else "", end="")
            print("loadtest.failover: the locust run ended early", file=sys.stderr)
            return 1
        settings = DrillSettings(args.shard, args.kind, manual=args.manual)
        try:
            report = asyncio.run(run_drill(DrillCluster.from_state(args.state_dir, state), settings, print))
        except DrillError as exc:
            print(f"loadtest.failover: drill failed: {exc}", file=sys.stderr)
    finally:
        output, _ = locust.communicate()
    print("\n== failover drill during load ==")
    print(format_report(report) if report else "no report (the drill did not finish)")
    print("\n== the locust run (mixed scenario) ==")
    print(output, end="")
    if args.report:
        load = json.loads(load_report.read_text()) if load_report.exists() else None
        args.report.write_text(json.dumps({"drill": report, "load": load}, indent=2) + "\n")
    if report is None or locust.returncode not in (0, EXIT_SLO):
        return EXIT_INVARIANT if locust.returncode == EXIT_INVARIANT else 1
    return 0 if report["ok"] else EXIT_INVARIANT


if __name__ == "__main__":
    sys.exit(main())
