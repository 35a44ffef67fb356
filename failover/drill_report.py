"""A failover drill's report: what clients saw, what the databases hold, and what the
fault led to.

The report (a JSON document; `format_report` prints it as text) gives the time to
detect (the controller's detection, or the drill's own probe with `manual`; the first
failed booking otherwise), to promote (fault to the map change), to the map at every
gateway, write unavailability per shard (last success before the first failure to the
first success after it) and the longest gap between two successes from the fault on
(held writes fail nothing but still pause), client errors by kind, confirmed and
missing bookings, oversold tiers, duplicated references.

Rules:
- `ok`: nothing confirmed is missing, nothing is oversold or duplicated (the data).
- `outcome`: `failed-over` (the map named another primary at a higher epoch) or
  `survived-without-failover` with `why` (the platform kept or got its writes back
  without a change of primary: the old primary came back before any promotion). A
  drill says what happened; it never reports a failover that did not happen.
- `expected`: what the platform's rules say the fault leads to, decided before the
  fault (failover/drill_waits.py `no_failover_expected`): `failed-over`, or
  `survived-without-failover` with `expectedWhy` when no copy may be promoted by
  itself (a member of the synchronous standby set dies with the primary: an operator
  decides). Then the host stays down for an outage of its own and comes back.
- `passed`: `ok` and the outcome is the expected one: the drill drilled what it says.
Times are the drill's monotonic clock, except `detectSeconds` from a controller's record.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from failover.drill_cluster import Auditor
from failover.drill_load import Load, _r, write_figures
from region_map import Shard

FAILED_OVER = "failed-over"
SURVIVED = "survived-without-failover"


@dataclass
class Facts:
    """What a drill recorded, for its report (instants: the drill's time.monotonic())."""

    shard: str
    kind: str
    manual: bool
    before: Shard
    after: Shard
    hosts: list[str]
    load: Load
    fault_at: float
    fault_wall: float
    changed_at: float | None  # the map change; None: there was none (see `why`)
    per_gateway: dict[str, float]
    recovered_at: float
    final: dict[str, Shard] = field(default_factory=dict)
    restored_at: float = 0.0
    detected_at: float | None = None
    promotion: dict[str, Any] | None = None  # the manual promotion's or the switchover's report
    record: dict[str, Any] | None = None  # the controller's record of its promotion
    restarted: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    why: str = ""  # with changed_at None: how the platform survived without a failover
    expected: str = FAILED_OVER  # what the platform's rules say the fault leads to
    expected_why: str = ""  # with SURVIVED expected: why no automatic failover


async def build_report(f: Facts, auditor: Auditor) -> dict[str, Any]:
    figures = write_figures(f.load.attempts, f.fault_at)
    errors = collections.Counter(a.kind for a in f.load.attempts if not a.ok)
    audits: dict[str, Any] = {}
    lost = oversold = duplicated = 0
    for name, shard in f.final.items():
        event = f.load.events.get(name)
        if event is None:
            continue
        audit = await auditor.audit(name, shard.primary_copy, event["id"], f.load.prefix)
        confirmed = f.load.confirmed.get(name, [])
        missing = [b for b in confirmed if audit.bookings.get(b) != "confirmed"]
        lost += len(missing)
        oversold += len(audit.oversold)
        duplicated += len(audit.duplicated)
        audits[name] = {"primary": shard.primary_copy, "confirmed": len(confirmed),
                        "found": len(confirmed) - len(missing), "missing": len(missing),
                        "missingIds": missing[:10], "oversold": audit.oversold,
                        "duplicatedReferences": audit.duplicated}
    record = f.record
    if f.detected_at is not None:
        detect, detected_by = f.detected_at - f.fault_at, "the drill's probe of the primary's node agent"
    elif record is not None and (seen := parse_wall(record.get("detectedAt"))) is not None:
        detect, detected_by = seen - f.fault_wall, f"controller ({record.get('kind', 'failover')})"
    else:
        detect, detected_by = None, None
    drilled = figures.get(f.shard, {})
    if detect is None and drilled.get("firstFailureSeconds") is not None:
        detect, detected_by = drilled["firstFailureSeconds"], "the first failed booking"
    gaps = [g["longestGapSeconds"] for g in figures.values() if g["longestGapSeconds"] is not None]
    ok = lost == 0 and oversold == 0 and duplicated == 0
    failed_over = f.changed_at is not None
    return {
        "shard": f.shard, "kind": f.kind, "mode": "manual" if f.manual else "automatic",
        "startedAt": wall(f.fault_wall), "faultHosts": f.hosts,
        "outcome": FAILED_OVER if failed_over else SURVIVED, "why": f.why or None,
        "expected": f.expected, "expectedWhy": f.expected_why or None,
        "oldPrimary": f.before.primary_copy, "newPrimary": f.after.primary_copy,
        "oldEpoch": f.before.epoch, "newEpoch": f.after.epoch,
        "times": {
            "detectSeconds": _r(detect), "detectedBy": detected_by,
            "promoteSeconds": None if f.changed_at is None else _r(f.changed_at - f.fault_at),
            "mapAtEveryGatewaySeconds": _r(max(f.per_gateway.values())) if f.per_gateway else None,
            "mapAtGatewaySeconds": {k: _r(v) for k, v in f.per_gateway.items()},
            "writesBackSeconds": _r(f.recovered_at - f.fault_at),
            "fullStrengthSeconds": _r(f.restored_at - f.fault_at),
            "controller": None if record is None else {
                k: record.get(k) for k in ("confirmSeconds", "promoteSeconds", "totalSeconds",
                                           "detectedAt", "promotedAt")},
        },
        "writes": {"perShard": figures, "longestGapSeconds": _r(max(gaps) if gaps else None)},
        "clientErrors": dict(errors.most_common()),
        "bookings": {"confirmed": sum(len(v) for v in f.load.confirmed.values()), "missing": lost,
                     "oversold": oversold, "duplicatedReferences": duplicated, "perShard": audits},
        "events": {name: str(event["id"]) for name, event in f.load.events.items()},  # unlisted
        "restarted": f.restarted, "pausedControllers": f.paused,
        "promotion": f.promotion,
        "ok": ok,
        "passed": ok and (FAILED_OVER if failed_over else SURVIVED) == f.expected,
    }


def format_report(report: dict[str, Any]) -> str:
    """The drill's report as text."""
    t, w, b = report["times"], report["writes"], report["bookings"]

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}s"
    outcome, expected = report.get("outcome", FAILED_OVER), report.get("expected", FAILED_OVER)
    if not report["ok"]:
        verdict = "FAILED"
    elif outcome != expected and outcome == SURVIVED:
        verdict = f"NO FAILOVER: {report.get('why') or 'the primary never changed'}"
    elif outcome != expected:
        verdict = f"UNEXPECTED FAILOVER (expected none: {report.get('expectedWhy')})"
    elif outcome == SURVIVED:
        verdict = f"OK, no failover, as expected: {report.get('why')}"
    else:
        verdict = "OK"
    lines = [
        f"drill {report['kind']} on {report['shard']} ({report['mode']}), {report['startedAt']}: {verdict}",
        f"  fault: {', '.join(report['faultHosts']) or 'planned switchover'}; primary "
        f"{report['oldPrimary']} -> {report['newPrimary']} "
        f"(epoch {report['oldEpoch']} -> {report['newEpoch']})",
        f"  detect {sec(t['detectSeconds'])} ({t['detectedBy'] or 'not measured'}), promote (map change) "
        f"{sec(t['promoteSeconds'])}, map at every gateway {sec(t['mapAtEveryGatewaySeconds'])}, "
        f"writes back {sec(t['writesBackSeconds'])}, full strength {sec(t['fullStrengthSeconds'])}",
    ]
    if t.get("controller"):
        c = t["controller"]
        lines.append(f"  controller: confirm {sec(c.get('confirmSeconds'))}, promote "
                     f"{sec(c.get('promoteSeconds'))}, detection to promoted {sec(c.get('totalSeconds'))}")
    lines.append("  writes:   SHARD        ATTEMPTS  CONFIRMED  FAILED  UNAVAILABLE  LONGEST GAP")
    for shard, f in w["perShard"].items():
        lines.append(f"            {shard:<12} {f['attempts']:>8}  {f['confirmed']:>9}  {f['failed']:>6}  "
                     f"{sec(f['unavailableSeconds']):>11}  {sec(f['longestGapSeconds']):>11}")
    errors = ", ".join(f"{k}: {v}" for k, v in report["clientErrors"].items()) or "none"
    lines.append(f"  client errors: {errors}")
    lines.append(f"  bookings: {b['confirmed']} confirmed, {b['missing']} missing, {b['oversold']} oversold "
                 f"tiers, {b['duplicatedReferences']} duplicated references")
    if report["restarted"]:
        lines.append(f"  restarted: {', '.join(report['restarted'])}")
    return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


def wall(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_wall(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
