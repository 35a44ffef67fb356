"""`boxoffice drill chaos`: a nemesis for SREs, in seeded rounds, under booking load.

Jepsen's nemesis, brought inside: a schedule of operations and faults drawn from one
`random.Random(seed)` (every choice and every timing: the same seed replays the same
schedule; what it hits depends on the map at that moment, and is printed), run against
a live cluster while clients book through every gateway; then everything is healed and
checked (drills/checks.py).

1. full strength: every shard has one primary, at the map's epoch. The drill creates
   its events through a gateway's operator API: one anchor per shard (never moved: it
   shows that shard is writable) and `movable_per_shard` that operations move around.
   Clients book one ticket at a time on each of them through every gateway
   (failover/drill.py's `Load`, every reference under one run prefix).
2. rounds. Each round draws one operation and 1..`max_faults` faults:
   - operations (`OPERATIONS`): `switchover` of a shard to a standby of its synchronous
     set, `move` of a movable event to another shard, `create` of an event (one tier,
     placed on a shard), each run as a `boxoffice` subprocess (an operation runner is
     a process: a fault can kill or pause it); `kill-controller` kills the controller
     holding the lock;
   - faults (drills/faults.py `FAULTS`) at random moments, each healed after a random
     time; a fault on the runner only in a round that has one.
   At the round's end (`round_seconds`, or when its last fault healed) every fault
   still in force is healed (`Nemesis.heal_all`), the runner gets `op_timeout` seconds
   to finish (then it is killed, and that is said), and the round waits up to
   `heal_bound` seconds for a booking confirmed on every shard's anchor event after
   the heal. A shard that stays unwritable fails the round (with what its copies said).
3. the final heal and the checks of drills/checks.py, then the verdict: `ok` only when
   every round recovered and every check passed.

The report (`to_json`) has the seed, each round (its plan, what was done when, in
seconds from the drill's start, what the runner answered, when each shard took a
booking again) and every finding. The platform is never helped: no journal is
resumed, no move aborted, no copy promoted by the drill; whatever converges does so
by itself. The one thing the drill does as a client: an event creation not answered
2xx (it has no journal; its answer asks for the same request, with the same id, again)
is sent again once after the heal, as a careful operator would, and checked as such.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from drills.checks import (
    Finding,
    Step,
    bookings,
    describe_copies,
    events,
    primaries,
    standbys,
    steps_survived,
)
from drills.faults import RUNNER_FAULTS, ConsulControl, FaultPlan, Nemesis, Skipped
from drills.places import Places, signal_pid
from drills.runner import OperationRunner
from drills.schedule import ChaosError, ChaosSettings, OpPlan, RoundPlan, plan_rounds
from failover.agents import NodeAgents
from failover.drill_load import Load
from region_map import ConsulMapStore, MapError, RegionMap

if TYPE_CHECKING:
    from deploy.cluster import Cluster


@dataclass
class ChaosTarget:
    """The cluster the drill acts on: its places, and who restarts what it kills."""

    places: Places
    restart: Callable[[], list[str]]  # the launcher's dead processes, started again
    consul: ConsulControl | None  # restartable Consul (None: it is paused instead)
    under_up: bool = False

    @classmethod
    def from_state(cls, state_dir: Path) -> ChaosTarget:
        """`boxoffice up`'s cluster: `up` restarts what dies within a second."""
        return cls(Places.load(state_dir), lambda: [], None, under_up=True)

    @classmethod
    def from_cluster(cls, cluster: Cluster) -> ChaosTarget:
        """A cluster this process started (tests)."""
        assert cluster.consul is not None
        return cls(Places.load(cluster.state_dir), cluster.restart_dead, cluster.consul)


@dataclass
class RoundRecord:
    n: int
    started: float  # seconds from the drill's start
    plan: dict[str, Any]
    lines: list[str] = field(default_factory=list)  # what was done, when
    operation: dict[str, Any] | None = None
    recovered: dict[str, float | None] = field(default_factory=dict)  # shard -> seconds after the heal
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"round": self.n, "startedSeconds": round(self.started, 2), "plan": self.plan,
                "log": self.lines, "operation": self.operation, "recoveredSeconds": self.recovered,
                "failures": self.failures}


STATUS_TIMEOUT = 10.0  # seconds for a node agent's GET /agent/copies

# What a runner's JSON answer is summed up by, in the round's line.
ANSWER_KEYS = ("outcome", "kind", "detail", "shard", "source", "target", "newPrimary", "newEpoch")


class _Chaos:
    def __init__(self, target: ChaosTarget, settings: ChaosSettings, say: Callable[[str], None]) -> None:
        self.t, self.s, self.say = target, settings, say
        state = target.places.state
        host, _, port = str(state["consul"]).rpartition(":")
        self.store = ConsulMapStore(host=host, port=int(port),
                                    prefix=str(state.get("mapPrefix", "boxoffice/")),
                                    token=target.places.consul_token)
        self.token = str(state["adminToken"])
        # An observer, not a controller: it can wait longer for an agent on a loaded host.
        self.agents = NodeAgents(self.store, self.token, status_timeout=STATUS_TIMEOUT)
        self.nemesis = Nemesis(target.places, target.restart, target.consul, self.token)
        self.gateways = {str(k): str(v) for k, v in state["gateways"].items()}
        self.began = time.monotonic()
        self.prefix = f"chaos-{settings.seed}-{uuid.uuid4().hex[:6]}-"
        self.steps: list[Step] = []
        self.known: dict[str, str] = {}  # event id -> what it is to the drill
        self.anchors: dict[str, str] = {}  # shard -> its anchor event
        self.movables: list[str] = []
        self.rounds: list[RoundRecord] = []
        self.runners: list[OperationRunner] = []
        self.map: RegionMap | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="boxoffice-chaos-"))  # event specs for the runners
        self.unlisted: bool | None = None  # whether the platform takes `unlisted` (first creation)

    async def close(self) -> None:
        for runner in self.runners:
            if runner.running and runner.pid is not None:
                signal_pid(runner.pid, signal.SIGCONT)
                signal_pid(runner.pid, signal.SIGKILL)
        await self.agents.close()
        await self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def now(self) -> float:
        return time.monotonic() - self.began

    def log(self, rec: RoundRecord, line: str) -> None:
        rec.lines.append(f"+{self.now():.1f}s {line}")
        self.say(f"  +{self.now():6.1f}s {line}")

    async def read_map(self) -> RegionMap:
        """The map now, or the last one read when Consul does not answer within 5 s."""
        try:
            self.map = await asyncio.wait_for(self.store.load(), 5)
        except (MapError, TimeoutError):
            if self.map is None:
                raise
        return self.map

    async def create_events(self, shards: list[str]) -> dict[str, dict[str, Any]]:
        docs: dict[str, dict[str, Any]] = {}
        gateway = next(iter(self.gateways.values()))
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as http:
            for shard in shards:
                for n in range(1 + self.s.movable_per_shard):
                    body = {"name": f"Chaos drill {self.prefix}{shard}-{n}", "venue": "Drill Hall",
                            "startsAt": "2030-01-01T20:00:00Z", "currency": "USD", "shard": shard,
                            "tiers": [{"name": "Drill", "priceCents": 100, "capacity": 1_000_000}]}
                    status, doc = await self._post_event(http, gateway, body)
                    if status != 201:
                        raise ChaosError(f"creating the drill's event on {shard}: {status} {doc}")
                    docs[doc["id"]] = doc
                    if n == 0:
                        self.anchors[shard] = doc["id"]
                        self.known[doc["id"]] = f"anchor of {shard}"
                    else:
                        self.movables.append(doc["id"])
                        self.known[doc["id"]] = f"movable, created on {shard}"
        return docs

    async def _post_event(self, http: aiohttp.ClientSession, gateway: str,
                          body: dict[str, Any]) -> tuple[int, Any]:
        """Create an event unlisted (kept out of the public listing, seen by the audit);
        without the flag where the platform does not know it yet (400)."""
        for flag in ([True, False] if self.unlisted is None else [self.unlisted]):
            async with http.post(f"{gateway}/admin/events",
                                 json=body | ({"unlisted": True} if flag else {})) as resp:
                doc = await resp.json(content_type=None)
                if resp.status == 201 or resp.status != 400 or not flag:
                    if resp.status == 201:
                        self.unlisted = flag
                    return resp.status, doc
        raise AssertionError("unreachable")

    # -- a round -----------------------------------------------------------------------
    async def operation(self, op: OpPlan, rec: RoundRecord) -> OperationRunner | None:
        """Start the round's operation (kill-controller: do it); its runner."""
        m = await self.read_map()
        if op.kind == "kill-controller":
            try:
                what, _ = await self.nemesis.kill_controller()
            except Skipped as exc:
                what = f"skipped ({exc})"
            self.log(rec, f"operation kill-controller: {what}")
            return None
        if op.kind == "switchover":
            shard = m.shards[op.shard]
            candidates = sorted(k for k in shard.sync_standbys
                                if k in shard.members and k != shard.primary_copy)
            if not candidates:
                self.log(rec, f"operation switchover of {op.shard}: skipped (no synchronous standby)")
                return None
            target = candidates[op.pick % len(candidates)]
            argv, what = ["shard", "switchover", op.shard, "--to", target, "--json"], \
                f"switchover of {op.shard} ({shard.primary_copy}, epoch {shard.epoch}) to {target}"
            step = Step("switchover", False, shard=op.shard, target=target)
        elif op.kind == "move":
            event = self.movables[op.pick % len(self.movables)]
            here = m.placements.get(event)
            others = sorted(n for n in m.shards if n != here)
            target = others[op.pick2 % len(others)]
            argv, what = ["event", "move", event, "--to-shard", target, "--json"], \
                f"move of event {event} {here} -> {target}"
            step = Step("move", False, event=event, target=target)
        else:
            event = str(uuid.uuid4())
            self.known[event] = f"created by round {rec.n}"
            spec = self.tmp / f"event-{event}.json"
            spec.write_text(json.dumps({"unlisted": True} if self.unlisted else {}))
            argv = ["event", "create", str(spec), "--id", event,
                    "--name", f"Chaos drill {self.prefix}round-{rec.n}", "--venue", "Drill Hall",
                    "--starts-at", "2030-01-01T20:00:00Z", "--currency", "USD",
                    "--tier", "Drill:100:1000", "--shard", op.shard, "--json"]
            what = f"creation of event {event} on {op.shard}"
            step = Step("create", False, shard=op.shard, event=event)
        runner = OperationRunner(self.t.places.state_dir, argv, what, step)
        await runner.start()
        self.runners.append(runner)
        self.log(rec, f"operation {what}: runner pid {runner.pid}")
        return runner

    async def strike(self, f: FaultPlan, rec: RoundRecord, t0: float,
                     runner_at: asyncio.Future[tuple[float, OperationRunner | None]]) -> None:
        runner = None
        if f.kind in RUNNER_FAULTS:
            started, runner = await runner_at
            await _sleep_until(started + f.at)
        else:
            await _sleep_until(t0 + f.at)
        try:
            m = await self.read_map()
            what, heal = await self.nemesis.inject(f, m.shards[f.shard], runner)
        except Skipped as exc:
            self.log(rec, f"{f.kind}: skipped ({exc})")
            return
        except (OSError, MapError, ValueError) as exc:
            self.log(rec, f"{f.kind}: could not be caused ({exc})")
            return
        self.log(rec, f"{f.kind}: {what}")
        if f.duration:
            await asyncio.sleep(f.duration)
            self.log(rec, f"{f.kind} healed: {await heal()}")

    async def round(self, plan: RoundPlan, load: Load) -> None:
        s = self.s
        rec = RoundRecord(plan.n, self.now(), _plan_json(plan))
        self.rounds.append(rec)
        self.say(f"round {plan.n} (+{self.now():.1f}s): "
                 + "; ".join([f"{plan.op.kind} at +{plan.op.at:.1f}s" if plan.op else "no operation"]
                             + [f.describe() for f in plan.faults]))
        t0 = time.monotonic()
        runner_at: asyncio.Future[tuple[float, OperationRunner | None]] = \
            asyncio.get_running_loop().create_future()
        strikes = [asyncio.create_task(self.strike(f, rec, t0, runner_at)) for f in plan.faults]
        runner = None
        if plan.op is not None:
            await _sleep_until(t0 + plan.op.at)
            try:
                runner = await self.operation(plan.op, rec)
            except (MapError, TimeoutError) as exc:
                self.log(rec, f"operation {plan.op.kind}: could not start ({exc})")
        runner_at.set_result((time.monotonic(), runner))
        await asyncio.gather(*strikes)
        await _sleep_until(t0 + s.round_seconds)
        for line in await self.nemesis.heal_all():
            self.log(rec, f"heal: {line}")
        heal_at = time.monotonic()
        self.log(rec, "healed everything")
        await self.recovery(rec, load, heal_at)
        if runner is not None:
            await self.finish(runner, rec, max(1.0, s.op_timeout - (time.monotonic() - heal_at)))

    async def recovery(self, rec: RoundRecord, load: Load, heal_at: float) -> None:
        pending = dict(self.anchors)
        while pending and time.monotonic() - heal_at < self.s.heal_bound:
            for shard, event in list(pending.items()):
                first = min((a.answered for a in load.attempts
                             if a.ok and a.shard == event and a.answered > heal_at), default=None)
                if first is not None:
                    rec.recovered[shard] = round(first - heal_at, 2)
                    del pending[shard]
            await asyncio.sleep(0.2)  # poll interval
        for shard, event in pending.items():
            rec.recovered[shard] = None
            try:
                copies = await describe_copies(self.agents, await self.read_map(), shard)
            except (MapError, KeyError) as exc:
                copies = f"not known ({exc})"
            failure = (f"{shard}: no booking confirmed on its anchor event {self.s.heal_bound:.0f}s after "
                       f"the heal (answers since: {load.answers_since(event, heal_at)}; copies: {copies})")
            rec.failures.append(failure)
            self.log(rec, f"STUCK {failure}")
        self.log(rec, "writable again after the heal: " + ", ".join(
            f"{k} {'-' if v is None else f'{v:.1f}s'}" for k, v in sorted(rec.recovered.items())))

    async def finish(self, runner: OperationRunner, rec: RoundRecord, timeout: float) -> None:
        code, killed = await runner.finish(timeout)
        if runner.step.kind == "create" and (code != 0 or killed):
            # An event creation has no journal: a creation not answered 2xx (its runner
            # killed, or "send the same request, with this id, again") is finished by its
            # client sending it again. A careful operator does, once, after the heal.
            said = runner.output[-1] if runner.output else "no output"
            self.log(rec, f"operation answered: exit {code}{' (killed)' if killed else ''}: "
                          f"{said[:300]}; sending the same request again")
            runner = OperationRunner(self.t.places.state_dir, runner.args, runner.what, runner.step)
            await runner.start()
            self.runners.append(runner)
            code, killed = await runner.finish(self.s.op_timeout)
        answer = runner.answer()
        step = runner.step
        ok = code == 0 and not killed
        if step.kind == "switchover" and ok:
            step = Step(step.kind, True, step.shard, step.event, step.target, answer.get("newEpoch"))
        else:
            step = Step(step.kind, ok, step.shard, step.event, step.target, step.epoch)
        self.steps.append(step)
        said = (" ".join(f"{k}={answer[k]}" for k in ANSWER_KEYS if answer.get(k) is not None)
                or (runner.output[-1] if runner.output else "no output"))
        how = f"killed {timeout:.0f}s after the heal (still running)" if killed else \
            f"exit {code}" if code is not None and code >= 0 else f"killed by signal {-(code or 0)}"
        if killed:
            rec.failures.append(f"the {runner.what} was still running "
                                f"{self.s.op_timeout:.0f}s after the heal")
        rec.operation = {"what": runner.what, "exit": code, "killedAtEnd": killed, "answer": said[:500],
                         "step": asdict(step)}
        self.log(rec, f"operation answered: {how}: {said[:300]}")

    # -- the whole drill -------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        s = self.s
        s.check()
        started_wall = time.time()
        self.say(f"chaos drill, seed {s.seed}: "
                 + (f"{s.rounds} rounds" if s.rounds is not None else f"{s.minutes:g} minutes")
                 + f" of {s.round_seconds:g}s; operations {', '.join(s.operations) or 'none'}; "
                 f"faults {', '.join(s.faults) or 'none'}")
        full, region_map = await primaries(self.store, self.agents, lambda _: True, time.monotonic(),
                                           s.heal_bound)
        if region_map is None or not all(f.ok for f in full):
            raise ChaosError("the cluster is not at full strength: "
                             + "; ".join(f.detail for f in full if not f.ok))
        shards = sorted(region_map.shards)
        docs = await self.create_events(shards)
        load = Load(self.gateways, docs, self.prefix, s.rate_per_client)
        load.start({e: s.clients_per_gateway for e in docs})
        self.say(f"  load: {len(docs) * s.clients_per_gateway * len(self.gateways)} clients on "
                 f"{len(docs)} events through {len(self.gateways)} gateways, references {self.prefix}*")
        findings: list[Finding] = []
        try:
            try:
                await load.wait_for(lambda: all(load.confirmed.get(e) for e in docs), s.heal_bound,
                                    "a confirmed booking on every drill event")
            except Exception as exc:
                raise ChaosError(str(exc)) from None
            for plan in plan_rounds(s.seed, s, shards):
                if (s.rounds is not None and plan.n > s.rounds) or \
                        (s.minutes is not None and self.now() >= s.minutes * 60):
                    break
                await self.round(plan, load)
            findings = await self.final(load)
        finally:
            await self.nemesis.heal_all()
            await load.finish()
        failed_rounds = [r for r in self.rounds if r.failures]
        ok = not failed_rounds and all(f.ok for f in findings)
        return {"seed": s.seed, "settings": asdict(s), "startedAt": _wall(started_wall),
                "seconds": round(self.now(), 1), "referencePrefix": self.prefix,
                "underUp": self.t.under_up, "events": self.known,
                "rounds": [r.to_json() for r in self.rounds],
                "checks": [f.to_json() for f in findings], "ok": ok}

    async def final(self, load: Load) -> list[Finding]:
        s = self.s
        self.say(f"final heal (+{self.now():.1f}s)")
        for line in await self.nemesis.heal_all():
            self.say(f"  {line}")
        heal_at = time.monotonic()
        findings, region_map = await primaries(
            self.store, self.agents, lambda shard: load.confirmed_after(self.anchors[shard], heal_at),
            heal_at, s.heal_bound)
        if region_map is None:
            return [*findings, Finding("map", False, "the region map could not be read after the heal")]
        findings += await standbys(self.agents, self.store, heal_at, s.heal_bound)
        dsns = self.t.places.dsns()
        deadline = time.monotonic() + s.heal_bound
        while True:  # a move's rollback may still be under way: give it the bound too
            try:
                region_map = await self.store.load()
                found, holders = await events(region_map, dsns, self.known, self.steps)
            except (MapError, OSError) as exc:
                found, holders = [Finding("events", False, f"could not be read: {exc}")], {}
            if all(f.ok for f in found) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)  # poll interval
        await load.finish()
        findings += found
        try:
            findings += await bookings(region_map, dsns, self.prefix, load.confirmed, holders)
        except OSError as exc:
            findings.append(Finding("bookings", False, f"could not be read: {exc}"))
        findings += steps_survived(region_map, self.steps, holders)
        return findings


async def run_chaos(target: ChaosTarget, settings: ChaosSettings,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the drill; its report (module docstring). Raises ChaosError."""
    chaos = _Chaos(target, settings, progress or (lambda _: None))
    try:
        return await chaos.run()
    finally:
        await chaos.close()


def format_verdict(report: dict[str, Any]) -> str:
    """The report's end as text: every failed round and check, then the verdict."""
    lines = [f"chaos drill, seed {report['seed']}, {len(report['rounds'])} rounds in {report['seconds']}s"]
    for r in report["rounds"]:
        for failure in r["failures"]:
            lines.append(f"  round {r['round']}: FAILED {failure}")
    for c in report["checks"]:
        lines.append(f"  {'ok    ' if c['ok'] else 'FAILED'} {c['check']}: {c['detail']}")
    lines.append(f"verdict: {'OK: nothing lost, oversold, duplicated or stuck' if report['ok'] else 'FAILED'}"
                 f" (seed {report['seed']}; the same seed replays the same schedule)")
    return "\n".join(lines)


def _plan_json(plan: RoundPlan) -> dict[str, Any]:
    return {"operation": asdict(plan.op) if plan.op else None, "faults": [asdict(f) for f in plan.faults]}


async def _sleep_until(instant: float) -> None:
    await asyncio.sleep(max(0.0, instant - time.monotonic()))


def _wall(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
