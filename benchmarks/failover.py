"""Failover: how long bookings pause when a shard's primary changes, beside Patroni.

    .venv/bin/python -m benchmarks.failover [--kind switchover|auto] [--runs 5] [--clients 16]
                                            [--shard shard-1] [--no-fsync]

Starts the default topology (deploy/topology.yaml: 3 regions x 3 shards, sync zone,
durable; OS-assigned ports, a temporary directory; the per-client booking rate limit
off, since every client here is one address), runs a booking load through every
gateway (asyncio clients, each booking one ticket at a time with a fresh
`clientReference` and sending it again until it is answered, as a careful client
does), and changes the shard's primary `--runs` times:

- `switchover`: `failover.switchover` (what `boxoffice shard switchover` runs),
  alternating between the home copy and its zone standby (`us-east` <-> `us-east/b`).

For each run it prints the write pause the clients saw (the longest time between two
successful bookings on the shard, from the last one before the change to the first one
after it), how long the gateways held the writes (the switchover's own figure), and
client errors; then the median and the worst, beside the Patroni 4.1.5 figures measured
on this machine (issue 8). Afterwards every confirmed booking must be on the final
primary and sold + remaining = capacity.

`--kind auto`: the primary's whole host is lost (its node agent SIGKILLed, its Postgres
servers and booking service dying with it) and the failover controllers alone restore
writes; the pause is the clients' longest gap between bookings from the kill to the
first booking after the map change (goal: <= 2 s median, <= 5 s worst; Patroni on this
machine: 20 s). The host is brought back between runs. Each kind is an entry of
`KINDS`: a coroutine that changes the primary once and returns what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from benchmarks.booking_load import TOKEN, Load, careful_client, create_event, say, topology
from deploy.cluster import Cluster
from deploy.topology import parse_topology
from failover import AgentError, NodeAgents
from failover.switchover import switchover
from region_map import ConsulMapStore, Shard
from shard_service.inventory import audit_inventory

PATRONI = {"switchover": "2.2-3.1 s (7 runs)", "auto": "20.0-20.8 s (3 runs)"}
GOALS = {"switchover": "<= 0.5 s median", "auto": "<= 2 s median, <= 5 s worst"}
SETTLE_TIMEOUT = 120.0


@dataclass
class Run:
    n: int
    change: str
    pause: float
    held: float | None
    seconds: float
    errors: int
    phases: str = ""  # where the time went: the steps (auto: `phases_of`)


@dataclass
class Bench:
    cluster: Cluster
    store: ConsulMapStore
    agents: NodeAgents
    shard: str
    load: Load


async def settled(bench: Bench, timeout: float = SETTLE_TIMEOUT) -> Shard:
    """Until every copy of the shard runs in its map role (standbys streaming)."""
    deadline = time.monotonic() + timeout
    while True:
        record, _ = await bench.store.read_shard(bench.shard)
        waiting = []
        for key in record.members:
            try:
                status = await bench.agents.copy_status(key, bench.shard)
            except AgentError as exc:
                waiting.append(f"{key}: {exc}")
                continue
            wanted = "primary" if key == record.primary_copy else "standby"
            if status.role != wanted or (wanted == "standby" and not status.streaming):
                waiting.append(f"{key}: {status.role}")
        if not waiting:
            return record
        if time.monotonic() > deadline:
            raise SystemExit(f"{bench.shard} did not settle: {waiting}")
        await asyncio.sleep(0.2)  # poll interval


async def run_switchover(bench: Bench, n: int) -> Run:
    record = await settled(bench)
    home = bench.cluster.topology.shards[bench.shard]
    target = f"{home}/b" if record.primary_copy == home else home
    before = sum(bench.load.answers[k] for k in bench.load.answers if k not in ("200", "201"))
    started = time.monotonic()
    # In a thread of its own, so the load's event loop does not slow the switchover down.
    report = await asyncio.to_thread(asyncio.run, _switch(bench, target))
    ended = time.monotonic()
    for _ in range(3000):  # until the first booking after it (at most 30 s)
        if any(t > ended for t in bench.load.confirmed_at):
            break
        await asyncio.sleep(0.01)  # poll interval
    errors = sum(bench.load.answers[k] for k in bench.load.answers if k not in ("200", "201")) - before
    steps = " | ".join(f"{s.name} {s.seconds:.3f}" for s in report.steps)
    promote = next((s for s in report.steps if s.name == "promote"), None)
    if promote is not None and "(" in promote.detail:  # the agent's own split of the step
        steps += " | " + promote.detail.split("(", 1)[1].rstrip(")")
    return Run(n, f"{record.primary_copy} -> {target}", bench.load.pause(started, ended),
               report.writes_held_seconds, report.seconds, errors, steps)


async def _switch(bench: Bench, target: str) -> Any:
    assert bench.cluster.consul is not None
    store = bench.cluster.consul_store()
    agents = NodeAgents(store, TOKEN)
    try:
        return await switchover(store, agents, bench.shard, target, owner="benchmarks.failover")
    finally:
        await agents.close()
        await store.close()


async def run_auto(bench: Bench, n: int) -> Run:
    """Lose the primary's host: its node agent SIGKILLed, and with it (parent-death
    signals) its Postgres servers and booking service. Nobody acts but the failover
    controllers. Then the host comes back (its agent restarted: the old primary rejoins
    as a rewound standby) before the next run."""
    record = await settled(bench)
    old = record.primary_copy
    before = sum(bench.load.answers[k] for k in bench.load.answers if k not in ("200", "201"))
    started, killed_wall = time.monotonic(), time.time()
    bench.cluster.agents[old].kill()
    while True:  # until the controller's promotion is in the map (at most SETTLE_TIMEOUT)
        now, _ = await bench.store.read_shard(bench.shard)
        if now.epoch > record.epoch:
            break
        if time.monotonic() - started > SETTLE_TIMEOUT:
            raise SystemExit(f"no automatic failover of {bench.shard} after {SETTLE_TIMEOUT:.0f}s")
        await asyncio.sleep(0.01)  # poll interval
    promoted = time.monotonic()
    for _ in range(3000):  # until the first booking after it (at most 30 s)
        if any(t > promoted for t in bench.load.confirmed_at):
            break
        await asyncio.sleep(0.01)  # poll interval
    errors = sum(bench.load.answers[k] for k in bench.load.answers if k not in ("200", "201")) - before
    first = min((t for t in bench.load.confirmed_at if t > promoted), default=None)
    record = await asyncio.to_thread(last_failover, bench.cluster, now.epoch)
    bench.cluster.restart_dead()  # the host comes back
    phases = phases_of(record, killed_wall) + (
        f"; map change -> next booking {first - promoted:.2f} s" if first is not None else "")
    return Run(n, f"{old} -> {now.primary_copy}", bench.load.pause(started, promoted),
               None, promoted - started, errors, phases)


def last_failover(cluster: Cluster, epoch: int) -> dict[str, Any]:
    """The controllers' record of the failover that made `epoch` ({} if none has it)."""
    for region in cluster.controllers:
        doc = cluster.controller_status(region).get("lastFailover") or {}
        if doc.get("newEpoch") == epoch:
            return dict(doc)
    return {}


def phases_of(record: dict[str, Any], killed_wall: float) -> str:
    """Where an automatic failover's time went, from the active controller's record:
    kill to detection (this host's wall clock on both sides: one machine), the grace,
    and each step of the promotion (`commit` is the map's check-and-set; `promote`, after
    it, is pg_promote and the epoch row on the new primary)."""
    if not record:
        return "no controller record"
    parts = []
    detected = record.get("detectedAt")
    if isinstance(detected, str):
        try:
            seconds = datetime.fromisoformat(detected).timestamp() - killed_wall
            parts.append(f"detect {seconds:.2f} ({record.get('signal') or '?'})")
        except ValueError:
            pass
    if record.get("confirmSeconds") is not None:
        parts.append(f"confirm {record['confirmSeconds']:.2f}")
    parts += [f"{s['name']} {s['seconds']:.3f}" for s in record.get("steps") or []]
    sync = next((s for s in record.get("steps") or [] if s.get("name") == "sync-set"), None)
    if sync and sync.get("detail"):
        parts.append(str(sync["detail"]))
    promote = next((s for s in record.get("steps") or [] if s.get("name") == "promote"), None)
    if promote and "(" in str(promote.get("detail")):  # the agent's own split of the step
        parts.append(str(promote["detail"]).split("(", 1)[1].rstrip(")"))
    return " | ".join(parts)


KINDS: dict[str, Callable[[Bench, int], Awaitable[Run]]] = {"switchover": run_switchover,
                                                            "auto": run_auto}


async def measure(cluster: Cluster, args: argparse.Namespace) -> tuple[list[Run], Load, dict[str, Any]]:
    assert cluster.plan is not None and cluster.consul is not None
    store = cluster.consul_store()
    agents = NodeAgents(store, TOKEN)
    load = Load()
    bench = Bench(cluster, store, agents, args.shard, load)
    home = cluster.topology.shards[args.shard]
    regions = list(cluster.topology.regions)
    urls = [cluster.plan.gateway_url(home if n % 2 == 0 else regions[n % len(regions)])
            for n in range(args.clients)]  # half through the home region's gateway
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        event = await create_event(session, cluster.plan.gateway_url(home), args.shard,
                                   "Failover bench")
        clients = [asyncio.create_task(careful_client(session, url, event, load, stop))
                   for url in urls]
        runs: list[Run] = []
        try:
            await settled(bench)
            await asyncio.sleep(2)  # warm-up under load
            for n in range(1, args.runs + 1):
                run = await KINDS[args.kind](bench, n)
                runs.append(run)
                what = "switchover" if args.kind == "switchover" else "kill to map change"
                say(f"  run {n}: {run.change:<22} pause {run.pause * 1000:6.0f} ms   held "
                    f"{'-' if run.held is None else f'{run.held * 1000:.0f} ms':>8}   "
                    f"{what} {run.seconds:.2f} s   client errors {run.errors}")
                if run.phases:
                    say(f"         {run.phases}")
                await asyncio.sleep(1)  # bookings flow between runs
        finally:
            stop.set()
            await asyncio.gather(*clients)
        final = await settled(bench)
    await agents.close()
    await store.close()
    return runs, load, {"event": event, "primary": final.primary_copy}


async def check(dsn: str, event_id: str, load: Load) -> tuple[int, bool]:
    """(confirmed bookings missing on the primary, invariants hold)."""
    conn = await asyncpg.connect(dsn)
    try:  # the benchmark's clients book under `bench-` references
        audit = await audit_inventory(conn, event_id=event_id, reference_prefix="bench-")
    finally:
        await conn.close()
    missing = sum(1 for booking_id in load.confirmed.values() if booking_id not in audit.bookings)
    return missing, audit.held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(KINDS), default="switchover")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--shard", default="shard-1")
    parser.add_argument("--no-fsync", action="store_true", help="fsync=off (default: durable)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-failover-"))
    os.chmod(workdir, 0o755)
    cluster = Cluster(parse_topology(topology()), workdir / "cluster", admin_token=TOKEN,
                      durable=not args.no_fsync, progress=say)
    try:
        say(f"starting the default topology ({'fsync off' if args.no_fsync else 'durable'}) ...")
        cluster.start()
        say(f"{args.kind} x {args.runs} on {args.shard}, {args.clients} booking clients:")
        runs, load, final = asyncio.run(measure(cluster, args))
        primary = cluster.databases[(args.shard, final["primary"])]
        missing, invariants = asyncio.run(check(primary.dsn, final["event"]["id"], load))
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    pauses = [r.pause for r in runs]
    held = [r.held for r in runs if r.held is not None]
    say("")
    say(f"{args.kind}: write pause seen by clients over {len(runs)} runs: median "
        f"{statistics.median(pauses):.3f} s, worst {max(pauses):.3f} s "
        f"(goal {GOALS[args.kind]}; Patroni 4.1.5 on this machine: {PATRONI[args.kind]})")
    if held:
        say(f"  writes held by the gateways: median {statistics.median(held):.3f} s, worst {max(held):.3f} s")
    say(f"  client errors during the changes: {sum(r.errors for r in runs)}; answers {dict(load.answers)}")
    say(f"  {len(load.confirmed)} bookings confirmed, {missing} missing on the final primary; "
        f"sold + remaining = capacity and one booking per reference: {'yes' if invariants else 'NO'}")
    if missing or not invariants:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
