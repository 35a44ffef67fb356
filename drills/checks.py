"""What must hold once every fault is healed (the chaos drill's final checks).

Each check answers a list of `Finding`s, one per thing looked at, each naming it
(shard, copy, event, booking) and the state found, so a failure says what to look at:

1. `primaries`: within `bound` seconds after the heal, every shard has exactly one
   writable primary: the map's primary copy runs as primary at the map's epoch, no
   other copy runs as primary, and a booking on the shard's anchor event (never
   moved) was confirmed after the heal. Its node agents are asked (GET /agent/copies).
2. `standbys`: within `bound` seconds too, every other copy of every shard runs as a
   standby and streams from the primary (its node agent says so): a copy that never
   comes back (a rewind that cannot finish, an agent that does not start it) leaves its
   host behind, and the shard one failure away from having no candidate.
3. `events`: on every shard's primary, no event is `frozen` or `importing` (the
   moves table, shard_service.queries.MOVE_STATE), and every event the drill knows
   (the map's placements and the drill's own) is held live (present, no move state)
   by exactly one shard, the one the map places it on. An event created by a runner
   that was killed may be held nowhere (its creation never got that far): that is
   said, and is a failure only if its creation was answered 2xx.
4. `bookings`: every booking answered 2xx (201, or 200 for a replay) exists,
   confirmed, on the shard that holds its event; on every shard sold + remaining =
   capacity for every tier, no remaining below zero, and no client reference names
   two bookings (shard_service.inventory.audit_inventory, in one snapshot).
5. `steps`: every operator step answered 2xx survived: a switchover's epoch is not
   gone back (the shard's epoch is at least the one it committed, and if no change
   came after it, its target is the primary); a moved event is placed on (and held
   by) the shard its last successful move named, or on a shard a later move tried;
   a created event is held and placed where its creation said.

The databases are read directly on each shard's primary, as operator tooling (the
load test's invariant check, the failover drill's audit) does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from failover.agents import AgentError, NodeAgents
from region_map import MapError, MapStore, RegionMap
from shard_service.inventory import audit_inventory
from shard_service.queries import MOVE_STATE

MAX_EVENTS = 5000  # placements checked beyond the drill's own events


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class Step:
    """An operator step the drill ran, as it was answered."""

    kind: str  # "switchover", "move", "create"
    ok: bool  # answered 2xx (the runner exited 0)
    shard: str | None = None  # switchover: the shard; create: where it was placed
    event: str | None = None  # move, create
    target: str | None = None  # switchover: the copy; move: the shard
    epoch: int | None = None  # switchover: the epoch it committed


async def describe_copies(agents: NodeAgents, region_map: RegionMap, name: str) -> str:
    """`map primary east epoch 3: east primary tl 3 epoch 3; east/b standby streaming; west no answer`."""
    shard = region_map.shards[name]
    parts = []
    for key in sorted(shard.members):
        try:
            c = await agents.copy_status(key, name)
        except AgentError:
            parts.append(f"{key} no answer")
            continue
        state = (f"epoch {c.epoch}" if c.role == "primary" else
                 "streaming" if c.streaming else "NOT streaming") if c.role else ""
        parts.append(" ".join(x for x in (key, c.role or "not running", f"tl {c.timeline}", state) if x))
    return f"map primary {shard.primary_copy} epoch {shard.epoch}: " + "; ".join(parts)


async def primaries(store: MapStore, agents: NodeAgents, writable: Callable[[str], bool],
                    since: float, bound: float) -> tuple[list[Finding], RegionMap | None]:
    """Check 1 (module docstring); `writable(shard)`: a booking on its anchor event was
    confirmed after `since`. Polls until every shard passes or `bound` seconds passed."""
    passed: dict[str, float] = {}
    last: dict[str, str] = {}
    region_map: RegionMap | None = None
    while True:
        try:
            region_map = await store.load()
            await agents.refresh()
        except (MapError, AgentError) as exc:
            last = {"*": f"the map or the agent registry did not answer ({exc})"}
        else:
            for name, shard in region_map.shards.items():
                if name in passed:
                    continue
                why = await _one_primary(agents, shard.name, shard.primary_copy, shard.epoch,
                                         list(shard.members))
                if why is None and not writable(name):
                    why = "no booking confirmed on its anchor event since the heal"
                if why is None:
                    passed[name] = time.monotonic() - since
                else:
                    last[name] = why
            if len(passed) == len(region_map.shards):
                break
        if time.monotonic() - since > bound:
            break
        await asyncio.sleep(0.5)  # poll interval
    findings = [Finding("primaries", True, f"{n}: one writable primary "
                        f"({region_map.shards[n].primary_copy if region_map else '?'}), "
                        f"{s:.1f}s after the heal" + (f" (until then: {last[n]})" if n in last else ""))
                for n, s in sorted(passed.items())]
    for name, why in sorted(last.items()):
        if name in passed:
            continue
        copies = await describe_copies(agents, region_map, name) if region_map and name != "*" else ""
        findings.append(Finding("primaries", False, f"{name}: no single writable primary {bound:.0f}s "
                                f"after the heal: {why}" + (f" [{copies}]" if copies else "")))
    return findings, region_map


async def _one_primary(agents: NodeAgents, shard: str, primary: str, epoch: int,
                       members: list[str]) -> str | None:
    """Why the shard has not exactly one primary, the map's, at the map's epoch (None: it has)."""
    others = []
    for key in members:
        try:
            c = await agents.copy_status(key, shard)
        except AgentError as exc:
            if key == primary:
                return f"its primary {primary}'s agent does not answer ({exc})"
            continue
        if key == primary and (c.role != "primary" or c.epoch != epoch):
            return f"its primary {primary} runs as {c.role or 'nothing'} (epoch {c.epoch}, map's {epoch})"
        if key != primary and c.role == "primary":
            others.append(f"{key} (epoch {c.epoch})")
    return f"other copies run as primary too: {', '.join(others)}" if others else None


async def standbys(agents: NodeAgents, store: MapStore, since: float, bound: float) -> list[Finding]:
    """Check 2: within `bound` seconds after the heal, every other copy of every shard was
    seen running as a standby and streaming (a copy that never comes back is a host left
    behind). A copy passes once seen so: a slow answer later does not undo it."""
    passed: set[str] = set()
    lacking: dict[str, str] = {}
    while True:
        lacking = {}
        try:
            region_map = await store.load()
            await agents.refresh()
        except (MapError, AgentError) as exc:
            lacking = {"*": f"the map or the agent registry did not answer ({exc})"}
        else:
            for name, shard in sorted(region_map.shards.items()):
                for key in sorted(k for k in shard.members if k != shard.primary_copy):
                    copy = f"{name}@{key}"
                    if copy in passed:
                        continue
                    try:
                        c = await agents.copy_status(key, name)
                    except AgentError as exc:
                        lacking[copy] = f"its node agent does not answer ({exc})"
                        continue
                    if c.role == "standby" and c.streaming:
                        passed.add(copy)
                    else:
                        lacking[copy] = (f"runs as {c.role}, " if c.role else "not running, ") + (
                            f"timeline {c.timeline}, {'streaming' if c.streaming else 'NOT streaming'}")
        if not lacking or time.monotonic() - since > bound:
            break
        await asyncio.sleep(0.5)  # poll interval
    return [Finding("standbys", not lacking, f"{len(passed) + len(lacking)} standby copies: {len(lacking)} "
                    f"not seen streaming {time.monotonic() - since:.1f}s after the heal")] + [
        Finding("standbys", False, f"{copy}: {why}") for copy, why in sorted(lacking.items())]


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=10)


async def events(region_map: RegionMap, dsns: Mapping[tuple[str, str], str], known: Mapping[str, str],
                 steps: list[Step]) -> tuple[list[Finding], dict[str, str | None]]:
    """Check 3; `known`: the drill's events (id -> what it is). Also answers each
    event's live holder (None: none or several), for the bookings check."""
    ids = dict.fromkeys(list(known) + sorted(region_map.placements)[:MAX_EVENTS])
    rows: dict[str, dict[str, tuple[str | None, str | None, bool]]] = {e: {} for e in ids}
    findings: list[Finding] = []
    for name, shard in sorted(region_map.shards.items()):
        conn = await _connect(dsns[(name, shard.primary_copy)])
        try:
            for event in ids:
                r = await conn.fetchrow(MOVE_STATE, uuid.UUID(event))
                assert r is not None
                rows[event][name] = (r["state"], r["move_id"], bool(r["present"]))
        finally:
            await conn.close()
    created_ok = {s.event for s in steps if s.kind == "create" and s.ok}
    holders: dict[str, str | None] = {}
    stuck = split = 0
    for event, per_shard in rows.items():
        label = known.get(event, "placed event")
        for name, (state, move_id, _) in sorted(per_shard.items()):
            if state in ("frozen", "importing"):
                stuck += 1
                findings.append(Finding("events", False, f"event {event} ({label}) is {state} on {name} "
                                        f"(move {move_id}); placed on {region_map.placements.get(event)}"))
        live = sorted(n for n, (state, _, present) in per_shard.items() if present and state is None)
        placed = region_map.placements.get(event)
        holders[event] = live[0] if len(live) == 1 else None
        if len(live) == 1 and live[0] == placed:
            continue
        if not live and placed is None and event in known and event not in created_ok:
            findings.append(Finding("events", True, f"event {event} ({label}) exists nowhere: its "
                                    "creation was not answered 2xx"))
            continue
        split += 1
        held = ", ".join(f"{n}: {'held' if p else 'absent'}{f' {s}' if s else ''}"
                         for n, (s, _, p) in sorted(per_shard.items()))
        findings.append(Finding("events", False, f"event {event} ({label}) is live on "
                                f"{', '.join(live) or 'no shard'}, placed on {placed or 'no shard'} "
                                f"({held})"))
    findings.insert(0, Finding("events", stuck == 0 and split == 0,
                               f"{len(rows)} events: {stuck} frozen or importing, {split} not on exactly "
                               "one shard (the one the map places them on)"))
    return findings, holders


async def bookings(region_map: RegionMap, dsns: Mapping[tuple[str, str], str], prefix: str,
                   confirmed: Mapping[str, list[str]], holders: Mapping[str, str | None]) -> list[Finding]:
    """Check 4; `confirmed`: event id -> the ids of its bookings answered 2xx."""
    found: dict[str, dict[str, str]] = {}
    findings: list[Finding] = []
    for name, shard in sorted(region_map.shards.items()):
        conn = await _connect(dsns[(name, shard.primary_copy)])
        try:
            audit = await audit_inventory(conn, reference_prefix=prefix)
        finally:
            await conn.close()
        found[name] = dict(audit.bookings)
        for t in audit.violations:
            findings.append(Finding("bookings", False, f"{name}: tier {t.tier_id} of event {t.event_id}: "
                                    f"capacity {t.capacity}, sold {t.sold}, remaining {t.remaining}"))
        for d in audit.duplicate_references:
            findings.append(Finding("bookings", False, f"{name}: reference {d.get('client_reference')} "
                                    f"names {d.get('bookings')} bookings"))
    total = missing = 0
    for event, ids in sorted(confirmed.items()):
        holder = holders.get(event)
        for booking in ids:
            total += 1
            if holder is not None and found[holder].get(booking) == "confirmed":
                continue
            missing += 1
            elsewhere = ", ".join(f"{n}: {b[booking]}" for n, b in sorted(found.items()) if booking in b)
            findings.append(Finding("bookings", False, f"booking {booking} (event {event}) answered "
                                    f"2xx is not confirmed on {holder or 'any single holder'}"
                                    f" ({'found on ' + elsewhere if elsewhere else 'found nowhere'})"))
    bad = len([f for f in findings if not f.ok]) - missing
    findings.insert(0, Finding("bookings", missing == 0 and bad == 0,
                               f"{total} bookings answered 2xx: {missing} missing; {bad} oversold tiers "
                               "or duplicated references"))
    return findings


def steps_survived(region_map: RegionMap, steps: list[Step],
                   holders: Mapping[str, str | None]) -> list[Finding]:
    """Check 5."""
    findings = []
    for n, step in enumerate(steps):
        if not step.ok:
            continue
        if step.kind == "switchover" and step.shard:
            shard = region_map.shards[step.shard]
            later = step.epoch is not None and shard.epoch > step.epoch
            ok = step.epoch is not None and (later or shard.primary_copy == step.target)
            findings.append(Finding("steps", ok, f"switchover of {step.shard} to {step.target} (epoch "
                                    f"{step.epoch}): now {shard.primary_copy} at epoch {shard.epoch}"))
        elif step.kind == "move" and step.event:
            later_moves = [s for s in steps[n + 1:] if s.kind == "move" and s.event == step.event]
            if any(s.ok for s in later_moves):
                continue  # the later successful move is the one checked
            allowed = {step.target} | {s.target for s in later_moves}
            placed, held = region_map.placements.get(step.event), holders.get(step.event)
            ok = placed in allowed and held == placed
            findings.append(Finding("steps", ok, f"move of {step.event} to {step.target}: placed on "
                                    f"{placed}, held live by {held or 'no single shard'}"))
        elif step.kind == "create" and step.event:
            placed, held = region_map.placements.get(step.event), holders.get(step.event)
            ok = placed == step.shard and held == placed
            findings.append(Finding("steps", ok, f"creation of {step.event} on {step.shard}: placed on "
                                    f"{placed}, held live by {held or 'no single shard'}"))
    return findings
