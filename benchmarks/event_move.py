"""Event moves: how long a moved event's writes pause, and what another event feels.

    .venv/bin/python -m benchmarks.event_move [--runs 5] [--clients 16] [--other-clients 8]
                                              [--source shard-1] [--target shard-2]
                                              [--baseline-seconds 5] [--operator-region REGION]
                                              [--no-fsync]

Starts the default topology (deploy/topology.yaml: 3 regions x 3 shards, sync zone,
durable; OS-assigned ports, a temporary directory; the per-client booking limits off,
since every client here is one address), creates two events on `--source` through the
source's home gateway (`POST /admin/events`, operator token) and runs careful booking
clients (benchmarks/booking_load.py) through every gateway on both: `--clients` on the
event that moves, `--other-clients` on the other one, which stays where it is.

1. Baseline: the same load for `--baseline-seconds` without a move: the other event's
   booking latency p50/p95 (a booking's latency is its client's wait, from the first
   send of its reference to the confirmation).
2. Moves: `event_ops.move.move_event` (what `boxoffice event move` and
   `POST /admin/events/{id}/move` run) moves the event `--runs` times back and forth
   between `--source` and `--target`, each step's progress printed. It runs in a thread
   of its own (its own event loop, so the clients' loop does not slow it), with a
   `ShardAdmin` on the operator token seeing the network from `--operator-region`
   (default: the source's home region, as that region's gateway admin API would; `none`:
   straight to every booking service, as the CLI on a shard's own host).
   Per move: the write pause of the moved event as the move reports it (from asking the
   source to freeze to the target's activation) and as its clients saw it (the longest
   time between two of its confirmed bookings across the move: the last before the move
   to the first after it), the other event's booking p95 during the move (it lives on
   `--source`: the move's source on odd moves, its target on even ones), rows copied,
   the move's duration, the load average before it, client errors.
3. Summary: median and worst pause against the goal (<= 0.5 s median, <= 1 s worst),
   the other event's p95 during moves against its baseline p95 of the same run.
4. Audit (shard_service.inventory.audit_inventory on each shard's primary database):
   every booking a client was told about exists, confirmed, on the moved event's final
   shard and nowhere else; sold + remaining = capacity; no reference on two bookings;
   the other event lost nothing. Client errors are printed by kind.

Exit status 1 when anything of the audit fails, a client saw an error other than load
shedding (`503 overloaded`, which a busy machine causes and a careful client sends
again), or a move failed or hung: a defect, not a slow figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from benchmarks.booking_load import (
    TOKEN,
    Load,
    careful_client,
    create_event,
    quantile,
    say,
    topology,
)
from deploy.cluster import Cluster
from deploy.topology import parse_topology
from event_ops.move import STEPS, MoveFailed, MoveProgress, MoveRefused, MoveReport, move_event
from event_ops.shard_admin import ShardAdmin
from shard_service.inventory import audit_inventory

GOAL_MEDIAN, GOAL_WORST = 0.5, 1.0  # seconds of write pause (issue 10, acceptance 8)
MOVED_PREFIX, OTHER_PREFIX = "bench-mv-", "bench-nb-"  # the two events' client references
MOVE_TIMEOUT = 180.0  # a move that takes longer hangs
FIRST_BOOKING_TIMEOUT = 30.0  # after a move, for the moved event's next booking
WARM_UP_SECONDS = 2.0
SHED = "503 overloaded"  # load shedding on a busy machine: the client sends it again
PAUSE_STEPS = ("freeze", "final-copy", "flip", "activate")  # the steps inside the pause


class Defect(Exception):
    """A move failed or hung, or the moved event took no booking after it: not a slow figure
    (what the audit finds is listed apart)."""


@dataclass
class MoveRun:
    n: int
    source: str
    target: str
    load_avg: float
    report: MoveReport
    pause_seen: float  # the clients' longest gap between bookings of the moved event
    other: list[float]  # the other event's booking latencies during the move
    other_side: str  # the other event's shard in this move: "source" or "target"
    errors: Counter[str] = field(default_factory=Counter)  # both events', during the move


@dataclass
class Bench:
    cluster: Cluster
    args: argparse.Namespace
    moved: Load = field(default_factory=Load)
    other: Load = field(default_factory=Load)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # "moving", "other"
    runs: list[MoveRun] = field(default_factory=list)
    base: tuple[float, float] = (float("nan"), float("nan"))  # the other event's p50, p95


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def show_progress(p: MoveProgress) -> None:
    """A step's end (its time and what it did); a begin only for what is not a step."""
    if p.state == "ok":
        say(f"      {p.step:<11}{ms(p.seconds):>10}  {p.detail}")
    elif p.step not in STEPS:
        say(f"      {p.step:<11}{'':>10}  {p.detail}")


async def _move(cluster: Cluster, rewrites: dict[str, str], event_id: str, to_shard: str) -> MoveReport:
    """One move, on the event loop of the thread it runs in."""
    assert cluster.consul is not None
    store = cluster.consul_store()
    try:
        async with ShardAdmin(TOKEN, address_rewrites=rewrites) as admin:
            return await asyncio.wait_for(
                move_event(store, admin, event_id, to_shard, progress=show_progress,
                           owner="benchmarks.event_move"), MOVE_TIMEOUT)
    except TimeoutError:
        raise Defect(f"the move to {to_shard} did not finish within {MOVE_TIMEOUT:.0f} s") from None
    except (MoveFailed, MoveRefused) as exc:
        raise Defect(f"the move to {to_shard} stopped: {type(exc).__name__} {exc.kind}: "
                     f"{exc.detail}") from None
    finally:
        await store.close()


def operator_network(cluster: Cluster, region: str) -> dict[str, str]:
    """The address rewrites of the move's calls: the network as `region` sees it."""
    assert cluster.plan is not None
    return {} if region == "none" else cluster.plan.rewrites_for(region)


async def run_move(bench: Bench, n: int, source: str, target: str, event_id: str) -> MoveRun:
    load_avg = os.getloadavg()[0]
    errors_before = bench.moved.errors + bench.other.errors
    say(f"  move {n}: {source} -> {target} (load average {load_avg:.1f})")
    started = time.monotonic()
    report = await asyncio.to_thread(asyncio.run, _move(
        bench.cluster, operator_network(bench.cluster, bench.args.operator_region), event_id, target))
    ended = time.monotonic()
    if report.outcome != "moved" or report.target != target or report.pause_seconds is None:
        raise Defect(f"move {n} reported {report.outcome} to {report.target} "
                     f"(pause {report.pause_seconds})")
    deadline = ended + FIRST_BOOKING_TIMEOUT
    while not any(t > ended for t in bench.moved.confirmed_at):  # its first booking after
        if time.monotonic() > deadline:
            raise Defect(f"no booking of the moved event confirmed within "
                         f"{FIRST_BOOKING_TIMEOUT:.0f} s after move {n}")
        await asyncio.sleep(0.01)  # poll: the clients run on this loop
    run = MoveRun(n, source, target, load_avg, report, bench.moved.pause(started, ended),
                  bench.other.latencies_between(started, ended),
                  "source" if source == bench.args.source else "target",
                  (bench.moved.errors + bench.other.errors) - errors_before)
    say(f"    pause {ms(report.pause_seconds)} (report), {ms(run.pause_seen)} (clients)   "
        f"other event p95 {ms(quantile(run.other, 0.95))} ({len(run.other)} bookings, on the "
        f"{run.other_side})   {report.bookings_copied} rows copied   {report.seconds:.2f} s   "
        f"client errors {dict(run.errors) or 0}")
    return run


async def baseline(bench: Bench, seconds: float) -> tuple[float, float]:
    started = time.monotonic()
    await asyncio.sleep(seconds)  # the load runs, nothing else happens
    ended = time.monotonic()
    other = bench.other.latencies_between(started, ended)
    moved = bench.moved.latencies_between(started, ended)
    say(f"  baseline, {seconds:.0f} s without a move: other event p50 {ms(quantile(other, 0.5))}, "
        f"p95 {ms(quantile(other, 0.95))} ({len(other)} bookings); moved event p50 "
        f"{ms(quantile(moved, 0.5))}, p95 {ms(quantile(moved, 0.95))} ({len(moved)} bookings), "
        f"longest gap {ms(bench.moved.pause(started, ended))}")
    return quantile(other, 0.5), quantile(other, 0.95)


async def measure(bench: Bench) -> None:
    """The baseline, then the moves; what it measured is kept in `bench` as it goes."""
    cluster, args = bench.cluster, bench.args
    assert cluster.plan is not None
    regions = list(cluster.topology.regions)
    gateways = [cluster.plan.gateway_url(r) for r in regions]
    home = cluster.plan.gateway_url(cluster.topology.shards[args.source])
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        moving = await create_event(session, home, args.source, "Move bench")
        other = await create_event(session, home, args.source, "Move bench neighbour")
        bench.events = {"moving": moving, "other": other}
        clients = [asyncio.create_task(careful_client(
            session, gateways[i % len(gateways)], moving, bench.moved, stop, MOVED_PREFIX))
            for i in range(args.clients)]
        clients += [asyncio.create_task(careful_client(
            session, gateways[i % len(gateways)], other, bench.other, stop, OTHER_PREFIX))
            for i in range(args.other_clients)]
        try:
            await asyncio.sleep(WARM_UP_SECONDS)  # warm-up under load
            bench.base = await baseline(bench, args.baseline_seconds)
            at = args.source
            for n in range(1, args.runs + 1):
                to = args.target if at == args.source else args.source
                bench.runs.append(await run_move(bench, n, at, to, moving["id"]))
                at = to
                await asyncio.sleep(1)  # bookings flow between moves
        finally:
            stop.set()
            await asyncio.gather(*clients)


async def audit(bench: Bench) -> list[str]:
    """What does not hold, one line each (nothing: all held); prints what was checked."""
    cluster, args, events = bench.cluster, bench.args, bench.events
    assert cluster.consul is not None
    store = cluster.consul_store()
    try:
        final, _ = await store.read_placement(events["moving"]["id"])
        primaries = {s: (await store.read_shard(s))[0].primary_copy for s in (args.source, args.target)}
    finally:
        await store.close()
    problems: list[str] = []
    checks = [("moved event", events["moving"]["id"], MOVED_PREFIX, bench.moved, final)]
    checks.append(("other event", events["other"]["id"], OTHER_PREFIX, bench.other, args.source))
    for name, event_id, prefix, load, shard in checks:
        for where in (args.source, args.target):
            conn = await asyncpg.connect(cluster.databases[(where, primaries[where])].dsn)
            try:
                found = await audit_inventory(conn, event_id=event_id, reference_prefix=prefix)
            finally:
                await conn.close()
            if found.duplicate_references:
                problems.append(f"{where}: references on two bookings: {found.duplicate_references}")
            if where != shard:
                say(f"  {name} on {where}, where it is not placed: {len(found.bookings)} bookings, "
                    f"{len(found.tiers)} tiers")
                if found.tiers or found.bookings:
                    problems.append(f"{name}: {len(found.bookings)} bookings and {len(found.tiers)} "
                                    f"tiers left on {where}, which it is not placed on")
                continue
            missing = [b for b in load.confirmed.values() if b not in found.bookings]
            unconfirmed = [b for b in load.confirmed.values()
                           if b in found.bookings and found.bookings[b] != "confirmed"]
            sold = sum(t.sold for t in found.tiers)
            say(f"  {name} on {where}: {len(load.confirmed)} bookings confirmed to clients, "
                f"{len(found.bookings)} stored, sold {sold}; missing {len(missing)}, not confirmed "
                f"{len(unconfirmed)}; sold + remaining = capacity: "
                f"{'yes' if not found.violations and found.tiers else 'NO'}")
            if missing or unconfirmed:
                problems.append(f"{name}: {len(missing)} confirmed bookings missing on {where} "
                                f"(e.g. {missing[:3]}), {len(unconfirmed)} not confirmed there "
                                f"(e.g. {unconfirmed[:3]})")
            if found.violations or not found.tiers:
                problems.append(f"{name}: sold + remaining != capacity on {where}: {found.violations}")
            # Every ticket sold is a confirmed client booking, or one whose client stopped
            # before hearing the answer.
            if not len(load.confirmed) <= sold <= len(load.confirmed) + load.unanswered:
                problems.append(f"{name}: sold {sold} on {where}, clients confirmed "
                                f"{len(load.confirmed)} and left {load.unanswered} unanswered")
    if final != (args.target if len(bench.runs) % 2 else args.source):
        problems.append(f"moved event placed on {final} after {len(bench.runs)} moves")
    return problems


def step_median(runs: list[MoveRun], step: str) -> float:
    return statistics.median(s["seconds"] for r in runs for s in r.report.steps if s["step"] == step)


def summary(bench: Bench, problems: list[str]) -> None:
    runs, base = bench.runs, bench.base
    say("")
    say("| move | from -> to | load avg | pause (report) | pause (clients) | other event p95 "
        "(its shard) | rows copied | duration |")
    say("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        say(f"| {r.n} | {r.source} -> {r.target} | {r.load_avg:.1f} | {ms(r.report.pause_seconds or 0)} "
            f"| {ms(r.pause_seen)} | {ms(quantile(r.other, 0.95))} ({r.other_side}) "
            f"| {r.report.bookings_copied:,} | {r.report.seconds:.2f} s |")
    say("")
    if runs:
        reported = [r.report.pause_seconds or 0.0 for r in runs]
        seen = [r.pause_seen for r in runs]
        steps = ", ".join(f"{name} {ms(step_median(runs, name))}" for name in PAUSE_STEPS)
        say(f"inside the pause, median per step: {steps}")
        for what, pauses in (("as the move reports it", reported), ("as the clients saw it", seen)):
            median, worst = statistics.median(pauses), max(pauses)
            met = median <= GOAL_MEDIAN and worst <= GOAL_WORST
            say(f"write pause of the moved event over {len(runs)} moves, {what}: median "
                f"{median:.3f} s, worst {worst:.3f} s (goal <= {GOAL_MEDIAN} s median, <= "
                f"{GOAL_WORST:.0f} s worst: {'met' if met else 'MISSED'})")
        during = [x for r in runs for x in r.other]
        p95 = quantile(during, 0.95)
        worst_move = max(quantile(r.other, 0.95) for r in runs)
        say(f"other event's booking p95 during the moves: {ms(p95)} over {len(during)} bookings "
            f"(worst move {ms(worst_move)}); baseline p50 {ms(base[0])}, p95 {ms(base[1])}: "
            f"{p95 / base[1]:.2f} x the baseline (worst move {worst_move / base[1]:.2f} x)")
    for name, load in (("moved event", bench.moved), ("other event", bench.other)):
        say(f"{name}: {len(load.confirmed)} bookings confirmed; client errors by kind: "
            f"{dict(load.errors) or 'none'}")
    say("audit: " + ("every confirmed booking stored once, on its event's shard only; "
                     "sold + remaining = capacity; the other event lost nothing"
                     if not problems else "FAILED"))
    for line in problems:
        say(f"  - {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16, help="on the event that moves")
    parser.add_argument("--other-clients", type=int, default=8, help="on the other event")
    parser.add_argument("--source", default="shard-1")
    parser.add_argument("--target", default="shard-2")
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument("--operator-region", default=None,
                        help="the region the move runs from (default: the source's home); none: "
                             "straight to every booking service")
    parser.add_argument("--no-fsync", action="store_true", help="fsync=off (default: durable)")
    args = parser.parse_args()
    doc = topology()
    parsed = parse_topology(doc)
    for shard in (args.source, args.target):
        if shard not in parsed.shards:
            parser.error(f"no shard {shard!r} in the topology")
    if args.source == args.target:
        parser.error("--source and --target must differ")
    args.operator_region = args.operator_region or parsed.shards[args.source]
    if args.operator_region not in (*parsed.regions, "none"):
        parser.error(f"--operator-region: one of {', '.join(parsed.regions)} or none")

    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-event-move-"))
    os.chmod(workdir, 0o755)
    cluster = Cluster(parsed, workdir / "cluster", admin_token=TOKEN,
                      durable=not args.no_fsync, progress=say)
    bench = Bench(cluster, args)
    problems: list[str] = []
    try:
        say(f"starting the default topology ({'fsync off' if args.no_fsync else 'durable'}) ...")
        cluster.start()
        say(f"event moves x {args.runs} between {args.source} and {args.target} (operator in "
            f"{args.operator_region}); {args.clients} booking clients on the moved event, "
            f"{args.other_clients} on another event of {args.source}, through every gateway:")
        try:
            asyncio.run(measure(bench))
        except Defect as exc:
            problems.append(f"DEFECT: {exc}")
            say(f"  DEFECT: {exc}")
        if bench.events:  # after a defect too: what did it lose?
            say("audit:")
            problems += asyncio.run(audit(bench))
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    summary(bench, problems)
    errors = bench.moved.errors + bench.other.errors
    if problems or set(errors) - {SHED}:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
