"""A series of failover drills against a running cluster, and their tally.

    .venv/bin/python -m benchmarks.drill_series [--state-dir DIR] [--runs 10]
                                                [--shard S ...] [--kind K ...] [--manual]

Against the cluster `boxoffice up` runs (its cluster.json in the state directory, as
`boxoffice drill failover` reads it; default `$BOXOFFICE_STATE_DIR` or
/tmp/boxoffice-<uid>), runs `boxoffice drill failover --shard S --kind K --json` as a
user would, as a separate process, `--runs` times for every shard of the map (or the
`--shard`s) and every kind (`failover.drill.KINDS`, or the `--kind`s): round after
round, each round one drill per (shard, kind). It prints one line per drill as it ends
and, at the end, a table per shard and kind: drills passed / run, and the median
detection, promotion (fault to the map change) and writes-back times of the drills
that failed over.

A drill passes when it exits 0: the fault led where the platform's rules say (a
failover; or none, after an outage, when no copy may be promoted by itself: a
`kill-region` of a `sync: zone` shard's home region) and nothing confirmed was lost,
oversold or duplicated (deploy/cli.py `cmd_drill_failover`). A drill whose outcome was
not the expected one (exit 3: its report says what happened) or that could not finish
(exit 2: its message says why) does not pass. Exit 0
when every drill passed, 1 otherwise. Timings are printed, never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.cli import default_state_dir
from failover.drill import KINDS
from region_map import ConsulMapStore

OUTCOMES = {0: "passed", 1: "FAILED (data)", 2: "FAILED (drill)", 3: "UNEXPECTED OUTCOME"}
DRILL_TIMEOUT = 900.0  # one drill, every wait of it included (its own waits are 120 s each)


@dataclass
class Run:
    shard: str
    kind: str
    code: int
    seconds: float
    report: dict[str, Any] | None
    message: str

    @property
    def passed(self) -> bool:
        return self.code == 0

    def time(self, key: str) -> float | None:
        value = ((self.report or {}).get("times") or {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None


def read_state(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state_dir / "cluster.json").read_text()))
    except (OSError, ValueError):
        sys.exit(f"no running cluster in {state_dir} (no readable cluster.json): `boxoffice up` first")


async def shard_names(state: dict[str, Any]) -> list[str]:
    host, _, port = str(state["consul"]).rpartition(":")
    prefix = str(state.get("mapPrefix", "boxoffice/"))
    token = state.get("consulToken")  # Consul's management token (ACLs: deploy/consul_acl.py)
    async with ConsulMapStore(host=host, port=int(port), prefix=prefix, token=token) as store:
        return sorted((await store.load()).shards)


def drill(state_dir: Path, shard: str, kind: str, manual: bool) -> Run:
    argv = [sys.executable, "-m", "deploy.cli", "--state-dir", str(state_dir), "drill", "failover",
            "--shard", shard, "--kind", kind, "--json", *(["--manual"] if manual else [])]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=DRILL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return Run(shard, kind, 2, time.monotonic() - started, None,
                   f"the drill did not end in {DRILL_TIMEOUT:.0f}s")
    seconds = time.monotonic() - started
    report = None
    if done.returncode in (0, 1, 3):
        try:
            report = json.loads(done.stdout)
        except ValueError:
            pass
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    message = "" if report is not None else (lines[-1] if lines else f"exit {done.returncode}, no output")
    if report is not None and report.get("outcome") != "failed-over":
        message = f"no failover: {report.get('why')}"
    elif report is not None and report.get("outcome") != report.get("expected"):
        message = f"unexpected failover: {report.get('expectedWhy')}"
    return Run(shard, kind, done.returncode, seconds, report, message)


def describe(run: Run) -> str:
    def sec(key: str) -> str:
        value = run.time(key)
        return "-" if value is None else f"{value:.2f}s"
    outcome = OUTCOMES.get(run.code, f"FAILED (exit {run.code})") if run.report is not None or run.code == 2 \
        else f"FAILED (exit {run.code}, no report)"
    text = f"{outcome}"
    if run.report is not None:
        r = run.report
        text += (f"  {r.get('oldPrimary')} -> {r.get('newPrimary')}  detect {sec('detectSeconds')}"
                 f"  promote {sec('promoteSeconds')}  writes back {sec('writesBackSeconds')}"
                 f"  lost {r['bookings']['missing']}")
    if run.message:
        text += f"  ({run.message})"
    return f"{text}  [{run.seconds:.0f}s]"


def median(runs: list[Run], key: str) -> str:
    values = [v for r in runs if r.report is not None and r.report.get("outcome") == "failed-over"
              and (v := r.time(key)) is not None]
    return f"{statistics.median(values):.2f}s" if values else "-"


def tally(runs: list[Run], shards: list[str], kinds: list[str]) -> str:
    lines = [f"{'SHARD':<12} {'KIND':<13} {'PASSED':>8}  {'DETECT':>8}  {'PROMOTE':>8}  {'WRITES BACK':>11}"
             "  (medians of the drills that failed over)"]
    for shard in shards:
        for kind in kinds:
            mine = [r for r in runs if (r.shard, r.kind) == (shard, kind)]
            passed = sum(r.passed for r in mine)
            lines.append(f"{shard:<12} {kind:<13} {f'{passed}/{len(mine)}':>8}  "
                         f"{median(mine, 'detectSeconds'):>8}  {median(mine, 'promoteSeconds'):>8}  "
                         f"{median(mine, 'writesBackSeconds'):>11}")
    total = sum(r.passed for r in runs)
    lines.append(f"{'all':<12} {'':<13} {f'{total}/{len(runs)}':>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.drill_series", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    parser.add_argument("--runs", type=int, default=10, help="drills per shard and kind")
    parser.add_argument("--shard", action="append", help="a shard (repeat; default: every shard)")
    parser.add_argument("--kind", action="append", choices=KINDS, help="a kind (repeat; default: every kind)")
    parser.add_argument("--manual", action="store_true", help="manual drills (the controllers paused)")
    args = parser.parse_args(argv)
    state = read_state(args.state_dir)
    shards = args.shard or asyncio.run(shard_names(state))
    kinds = args.kind or list(KINDS)
    total = args.runs * len(shards) * len(kinds)
    print(f"drill series: {args.runs} x {len(shards)} shards ({', '.join(shards)}) x {len(kinds)} kinds "
          f"({', '.join(kinds)}) = {total} drills, against {args.state_dir}", flush=True)
    runs: list[Run] = []
    try:
        for round_no in range(1, args.runs + 1):
            for shard in shards:
                for kind in kinds:
                    run = drill(args.state_dir, shard, kind, args.manual)
                    runs.append(run)
                    print(f"[{len(runs)}/{total}] round {round_no} {shard} {kind}: {describe(run)}",
                          flush=True)
    except KeyboardInterrupt:
        print(f"interrupted after {len(runs)} drills", flush=True)
    print()
    print(tally(runs, shards, kinds), flush=True)
    return 0 if runs and len(runs) == total and all(r.passed for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
