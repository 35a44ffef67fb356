"""Headless load test: locust as a library, then the SLO and the inventory invariants.

    .venv/bin/python -m loadtest.run --scenario mixed --users 50 --seconds 30
    .venv/bin/python -m loadtest.run --scenario flash-sale --users 20 --seconds 15 --report out.json

The cluster comes from `cluster.json` in the state directory `boxoffice up` writes
(`--state-dir`, default `$BOXOFFICE_STATE_DIR` or `/tmp/boxoffice-$UID`), or from
explicit `--gateway URL` (repeatable), `--admin-token` and `--primary-dsn NAME=DSN`.

Scenarios: `mixed` is browsing users and booking users, 3 to 1 (the SLO scenario of
MISSION.md §8); `flash-sale` creates a fresh event with one small tier through the
operator API and has every user hammer that tier until it is sold out.

Afterwards it prints per-endpoint count / p50 / p95 / failures, req/s and users per
core, whether the SLO held (p95 < 500 ms on every endpoint, at most 1 % failed
requests), and checks in every shard primary: sold + remaining = capacity for every
tier, no negative remaining, no reference on two bookings, and every booking a client
was told about exists with the status the client last saw.

Exit codes: 0 everything held; 1 could not run (no cluster, operator API refused);
3 an invariant failed; 4 the SLO was missed (invariants held).
"""

from __future__ import annotations

# Importing locust monkeypatches the process with gevent. Nothing imported before it
# may import ssl (gevent warns, and ssl misbehaves), hence urllib only inside _http.
import argparse
import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from locust import User
from locust.env import Environment

from deploy.cli import default_state_dir
from loadtest import locustfile
from loadtest.invariants import parse_primary
from loadtest.locustfile import LEDGER, BookingUser, BrowsingUser, FlashSaleUser, Gateway, HotTier

EXIT_OK = 0
EXIT_SETUP = 1
EXIT_INVARIANT = 3
EXIT_SLO = 4

SCENARIOS: dict[str, list[type[User]]] = {
    "mixed": [BrowsingUser, BookingUser],
    "flash-sale": [FlashSaleUser],
}
REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 15.0  # users finish the task they are in, so every answer is seen


class SetupError(Exception):
    pass


@dataclass
class Target:
    gateways: list[Gateway]
    admin_token: str | None
    primaries: dict[str, str]


# -- the cluster -----------------------------------------------------------------
def _http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:300]


def resolve_target(args: argparse.Namespace) -> Target:
    """Explicit flags win; `cluster.json` fills in the rest (only read when no
    --gateway is given, or --state-dir is, so two clusters are never mixed)."""
    state: dict[str, Any] = {}
    if not args.gateway or args.state_dir is not None:
        state_dir = args.state_dir or default_state_dir()
        path = state_dir / "cluster.json"
        try:
            state = json.loads(path.read_text())
        except OSError as exc:
            raise SetupError(f"no running cluster: cannot read {path} ({exc.strerror}); "
                             "start one with `boxoffice up` or pass --gateway") from None
    urls = args.gateway or list(state.get("gateways", {}).values())
    primaries = dict(parse_primary(raw, n) for n, raw in enumerate(args.primary_dsn, 1)) or dict(
        state.get("primaries", {})
    )
    if not primaries:
        raise SetupError("no shard primaries to check: pass --primary-dsn NAME=DSN "
                         "(or use a cluster.json that lists `primaries`)")
    if not urls:
        raise SetupError("no gateway: pass --gateway URL (or use a cluster.json that lists `gateways`)")
    gateways = []
    for url in urls:
        url = url.rstrip("/")
        try:
            status, doc = _http("GET", f"{url}/api/health")
        except OSError as exc:
            raise SetupError(f"gateway {url} is not answering: {exc}") from None
        if status != 200:
            raise SetupError(f"gateway {url} answered /api/health with {status}")
        gateways.append(Gateway(doc["region"], url))
    token = args.admin_token or state.get("adminToken") or os.environ.get("BOXOFFICE_ADMIN_TOKEN")
    return Target(gateways, token, primaries)


def create_hot_event(target: Target, capacity: int, shard: str | None, run_id: str) -> HotTier:
    """A fresh event with one small tier, visible through every gateway before the sale."""
    if not target.admin_token:
        raise SetupError("the flash sale creates its event through the operator API: "
                         "pass --admin-token (or use cluster.json)")
    body: dict[str, Any] = {
        "name": f"Flash sale {run_id}", "venue": "Load Test Arena",
        "startsAt": "2027-12-31T20:00:00Z", "currency": "USD",
        "tiers": [{"name": "Hot", "priceCents": 5000, "capacity": capacity}],
    }
    if shard:
        body["shard"] = shard
    status, doc = _http("POST", f"{target.gateways[0].url}/admin/events", body,
                        {"Authorization": f"Bearer {target.admin_token}"})
    if status != 201:
        raise SetupError(f"creating the flash-sale event failed: {status} {doc}")
    hot = HotTier(doc["id"], doc["tiers"][0]["id"])
    deadline = time.monotonic() + 10
    for gateway in target.gateways:  # each gateway's map must hold the new placement
        while _http("GET", f"{gateway.url}/api/events/{hot.event_id}/ticket-tiers")[0] != 200:
            if time.monotonic() > deadline:
                raise SetupError(f"gateway {gateway.region} never saw event {hot.event_id}")
            gevent.sleep(0.05)  # poll interval
    print(f"flash sale: event {hot.event_id} on {doc.get('shard')}, tier {hot.tier_id}, "
          f"capacity {capacity}", flush=True)
    return hot


# -- the load --------------------------------------------------------------------
REFUSED = (429, 503)  # rate-limited or shed (or unavailable): not admitted


@dataclass
class AnswerLog:
    """Every answer's status per endpoint, and the latency of the admitted ones (not
    429 or 503, and answered at all): what overload protection is judged by."""

    statuses: dict[tuple[str, str], Counter[int]] = field(default_factory=dict)
    admitted_ms: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def on_request(self, request_type: str, name: str, response_time: float, response_length: int,
                   response: Any = None, exception: Any = None, **_: Any) -> None:
        status = int(getattr(response, "status_code", 0) or 0)
        key = (request_type, name)
        self.statuses.setdefault(key, Counter())[status] += 1
        if status and status not in REFUSED:
            self.admitted_ms.setdefault(key, []).append(response_time)

    def reset(self) -> None:
        self.statuses.clear()
        self.admitted_ms.clear()

    def figures(self) -> dict[str, Any]:
        rows = []
        for (method, name), counts in sorted(self.statuses.items(), key=lambda kv: kv[0][::-1]):
            rows.append({"method": method, "name": name, **_share_figures(
                counts, self.admitted_ms.get((method, name), []))})
        everything: Counter[int] = Counter()
        for counts in self.statuses.values():
            everything.update(counts)
        admitted = [ms for values in self.admitted_ms.values() for ms in values]
        return {"endpoints": rows, "overall": _share_figures(everything, admitted)}


def _share_figures(counts: Counter[int], admitted_ms: list[float]) -> dict[str, Any]:
    total = sum(counts.values())

    def share(n: int) -> float:
        return round(n / total, 4) if total else 0.0

    return {
        "requests": total, "admitted": len(admitted_ms),
        "p95AdmittedMs": round(percentile(admitted_ms, 0.95), 1) if admitted_ms else None,
        "share429": share(counts[429]), "share503": share(counts[503]),
        "shareNoAnswer": share(counts[0]),
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class SaleClock:
    """The flash sale as its clients saw it, from the moment the first user starts (the
    sale opens then, so this is never reset after the ramp-up): when each booking
    answer arrived and how long it took. The sale lasts until the last 201."""

    started: float = field(default_factory=time.monotonic)
    answers: list[tuple[float, float, int]] = field(default_factory=list)  # (at s, took ms, status)

    def on_request(self, request_type: str, name: str, response_time: float, response_length: int,
                   response: Any = None, exception: Any = None, **_: Any) -> None:
        if request_type == "POST" and name.startswith("/api/bookings") and not name.endswith("/cancel"):
            status = int(getattr(response, "status_code", 0) or 0)
            self.answers.append((time.monotonic() - self.started, response_time, status))

    def figures(self) -> dict[str, Any] | None:
        booked = [at for at, _, status in self.answers if status == 201]
        if not booked:
            return None
        first, last = min(booked), max(booked)
        during = [took for at, took, _ in self.answers if at <= last]
        return {
            "firstBookedS": round(first, 3), "lastBookedS": round(last, 3),
            "sellOutSeconds": round(last - first, 3),  # first booking to the last ticket sold
            "bookings": len(booked),
            "bookingsPerSecond": round(len(booked) / (last - first), 1) if last > first else None,
            "bookingRequestsDuringSale": len(during),
            "p95DuringSaleMs": round(percentile(during, 0.95), 1),
        }


@dataclass
class LoadRun:
    env: Environment
    ramp_seconds: float
    seconds: float  # measured, after the ramp-up
    cpu_seconds: float
    answers: AnswerLog = field(default_factory=AnswerLog)
    sale: SaleClock = field(default_factory=SaleClock)


def run_load(user_classes: list[type[User]], users: int, spawn_rate: float, seconds: float,
             progress_every: float) -> LoadRun:
    """Ramp up, then measure `seconds` of steady load: the request statistics are reset
    once every user runs (the ledger of what clients were told covers the whole run)."""
    env = Environment(user_classes=user_classes, stop_timeout=STOP_TIMEOUT, catch_exceptions=True)
    answers = AnswerLog()
    env.events.request.add_listener(answers.on_request)
    runner = env.create_local_runner()
    sale = SaleClock()
    env.events.request.add_listener(sale.on_request)
    ramp_started = sale.started = time.monotonic()
    runner.start(users, spawn_rate=spawn_rate)
    assert runner.spawning_greenlet is not None
    runner.spawning_greenlet.join()
    env.stats.reset_all()
    answers.reset()
    cpu_before, started = os.times(), time.monotonic()
    print(f"  {users} users running after {started - ramp_started:.1f} s; measuring {seconds:g} s",
          flush=True)
    end, next_report = started + seconds, started + progress_every
    while (now := time.monotonic()) < end:
        gevent.sleep(min(next_report, end) - now)
        if time.monotonic() >= next_report:
            total = env.stats.total
            print(f"  {time.monotonic() - started:5.0f}s  users {runner.user_count:>4}  "
                  f"req/s {total.current_rps:7.1f}  failures {total.num_failures:>5}  "
                  f"booked {LEDGER.outcomes['booked']:>5}  sold out {LEDGER.outcomes['sold-out']:>5}",
                  flush=True)
            next_report += progress_every
    runner.quit()  # waits (up to STOP_TIMEOUT) for users to finish their current task
    elapsed = time.monotonic() - started
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return LoadRun(env, started - ramp_started, elapsed, cpu, answers, sale)


# -- after the load: figures, SLO, invariants --------------------------------------
def endpoint_figures(run: LoadRun) -> list[dict[str, Any]]:
    rows = []
    for (name, method), e in sorted(run.env.stats.entries.items()):
        if not e.num_requests:
            continue
        rows.append({
            "method": method, "name": name, "requests": e.num_requests, "failures": e.num_failures,
            "rps": round(e.num_requests / run.seconds, 1),
            "p50Ms": e.get_response_time_percentile(0.5), "p95Ms": e.get_response_time_percentile(0.95),
            "p99Ms": e.get_response_time_percentile(0.99), "maxMs": round(e.max_response_time),
        })
    return rows


def check_databases(target: Target, reference_prefix: str, tier_ids: list[str]) -> dict[str, Any]:
    """Run loadtest.invariants in a process of its own (asyncpg, no gevent)."""
    cmd = [sys.executable, "-m", "loadtest.invariants", "--reference-prefix", reference_prefix]
    for name, dsn in target.primaries.items():
        cmd += ["--primary", f"{name}={dsn}"]
    for tier_id in tier_ids:
        cmd += ["--tier", tier_id]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    if done.returncode != 0:
        raise SetupError(f"the invariant check could not run: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def check_ledger(run_bookings: dict[str, str]) -> dict[str, Any]:
    """Every booking a client was told about exists, with the status the client last saw."""
    missing, wrong_status = [], []
    for booking_id in LEDGER.bookings:
        status = run_bookings.get(booking_id)
        expected = "cancelled" if booking_id in LEDGER.cancelled else "confirmed"
        if status is None:
            missing.append(booking_id)
        elif status != expected and booking_id not in LEDGER.cancel_unknown:
            wrong_status.append({"id": booking_id, "told": expected, "database": status})
    # Bookings no client heard of: a request whose answer was lost (a timeout). Reported only.
    unacknowledged = [b for b in run_bookings if b not in LEDGER.bookings]
    return {
        "held": not missing and not wrong_status,
        "acknowledged": len(LEDGER.bookings), "missing": missing[:20], "wrongStatus": wrong_status[:20],
        "unacknowledged": len(unacknowledged),
    }


def build_report(args: argparse.Namespace, target: Target, hot: HotTier | None, run: LoadRun,
                 db: dict[str, Any]) -> dict[str, Any]:
    endpoints = endpoint_figures(run)
    total = run.env.stats.total
    exceptions = sum(row["count"] for row in run.env.runner.exceptions.values()) if run.env.runner else 0
    errors = total.num_failures + exceptions
    failure_ratio = errors / total.num_requests if total.num_requests else 1.0
    slow = [e for e in endpoints if e["p95Ms"] >= args.p95_ms]
    slo = {
        "p95LimitMs": args.p95_ms, "maxFailureRatio": args.max_failure_ratio,
        "latencyHeld": not slow and bool(endpoints),
        "slowEndpoints": [f"{e['method']} {e['name']}" for e in slow],
        "failureRatio": round(failure_ratio, 4), "errorsHeld": failure_ratio <= args.max_failure_ratio,
    }
    slo["held"] = slo["latencyHeld"] and slo["errorsHeld"]

    shards = db["shards"]
    ledger = check_ledger({k: v for s in shards.values() for k, v in s["runBookings"].items()})
    outcomes = dict(LEDGER.outcomes)
    client_checks_held = not outcomes.get("replay-mismatch") and not outcomes.get("duplicates-disagreed")
    invariants = {
        "held": db["held"] and ledger["held"] and client_checks_held,
        "shards": sorted(shards),
        "tiersChecked": sum(s["tiers"] for s in shards.values()),
        "inventory": [dict(v, shard=name) for name, s in shards.items() for v in s["violations"]],
        "duplicateReferences": [
            dict(d, shard=name) for name, s in shards.items() for d in s["duplicateReferences"]
        ],
        "ledger": ledger,
        "idempotency": {
            "replaysSameBooking": outcomes.get("replay-same-booking", 0),
            "replayMismatches": outcomes.get("replay-mismatch", 0),
            "duplicatesAgreed": outcomes.get("duplicates-agreed", 0),
            "duplicatesDisagreed": outcomes.get("duplicates-disagreed", 0),
        },
    }
    hot_tier = None
    if hot is not None:
        detail = next(
            (s["tierDetails"][hot.tier_id] for s in shards.values() if hot.tier_id in s["tierDetails"]), {}
        )
        hot_tier = {
            "eventId": hot.event_id, "tierId": hot.tier_id, **detail,
            "clientTickets": LEDGER.tickets_by_tier()[hot.tier_id],
            "soldOut": bool(detail) and detail["remaining"] == 0 and detail["sold"] == detail["capacity"],
        }
    cores = os.cpu_count() or 1
    report = {
        "scenario": args.scenario, "users": args.users, "seconds": round(run.seconds, 1),
        "rampUpSeconds": round(run.ramp_seconds, 1),
        "cpuCount": cores, "usersPerCore": round(args.users / cores, 1),
        "gateways": {g.region: g.url for g in target.gateways},
        "totals": {
            "requests": total.num_requests, "failures": total.num_failures, "taskExceptions": exceptions,
            "rps": round(total.num_requests / run.seconds, 1),
        },
        "loadGeneratorCpu": round(run.cpu_seconds / run.seconds, 2),
        "endpoints": endpoints,
        "errors": [{"method": e.method, "name": e.name, "error": str(e.error), "count": e.occurrences}
                   for e in sorted(run.env.stats.errors.values(), key=lambda e: -e.occurrences)[:10]],
        "outcomes": outcomes, "slo": slo, "invariants": invariants, "hotTier": hot_tier,
        "sale": run.sale.figures() if hot is not None else None,
        "admission": run.answers.figures(),
    }
    report["exitCode"] = (
        EXIT_INVARIANT if not invariants["held"] else EXIT_SLO if not slo["held"] else EXIT_OK
    )
    return report


def print_summary(r: dict[str, Any]) -> None:
    ok = {True: "held", False: "FAILED"}
    print()
    print(f"scenario {r['scenario']}: {r['users']} users for {r['seconds']} s after a "
          f"{r['rampUpSeconds']} s ramp-up, {r['cpuCount']} cores "
          f"({r['usersPerCore']} users per core); load generator used {r['loadGeneratorCpu']:.0%} of a core")
    print(f"{'endpoint':<46} {'reqs':>7} {'fails':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}")
    for e in r["endpoints"]:
        print(f"{e['method'] + ' ' + e['name']:<46} {e['requests']:>7} {e['failures']:>6} "
              f"{e['p50Ms']:>7.0f} {e['p95Ms']:>7.0f} {e['p99Ms']:>7.0f}")
    t = r["totals"]
    print(f"total: {t['requests']} requests, {t['rps']} req/s, {t['failures']} failed, "
          f"{t['taskExceptions']} task exceptions")
    for e in r["errors"][:5]:
        print(f"  {e['count']:>5} x {e['method']} {e['name']}: {e['error'][:120]}")
    overall = r["admission"]["overall"]
    if overall["share429"] or overall["share503"]:
        print(f"refused: {overall['share429']:.2%} rate-limited (429), {overall['share503']:.2%} "
              f"shed or unavailable (503); p95 of admitted requests {overall['p95AdmittedMs']} ms")
    if overall["share429"]:
        print("  (every locust user connects from this one machine's address, so the gateways' "
              "per-client booking limit treats them as one client: for a load test start the "
              "cluster with gateway.booking_rate_per_second: 0)")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items())))
    s = r["slo"]
    worst = max(r["endpoints"], key=lambda e: e["p95Ms"], default=None)
    print(f"SLO p95 < {s['p95LimitMs']:.0f} ms on every endpoint: {ok[s['latencyHeld']]}"
          + (f" (worst {worst['method']} {worst['name']} {worst['p95Ms']:.0f} ms)" if worst else "")
          + f"; failed requests {s['failureRatio']:.2%} (max {s['maxFailureRatio']:.0%}): "
          + ok[s["errorsHeld"]])
    i = r["invariants"]
    print(f"invariants over {i['tiersChecked']} tiers on {len(i['shards'])} shard primaries:")
    print(f"  sold + remaining = capacity, remaining >= 0: {ok[not i['inventory']]}")
    for v in i["inventory"][:10]:
        print(f"    {v}")
    print(f"  no client reference on two bookings: {ok[not i['duplicateReferences']]}")
    ledger = i["ledger"]
    print(f"  every acknowledged booking stored with the status the client saw: {ok[ledger['held']]} "
          f"({ledger['acknowledged']} acknowledged, {len(ledger['missing'])} missing, "
          f"{len(ledger['wrongStatus'])} wrong status; "
          f"{ledger['unacknowledged']} stored but never acknowledged)")
    idem = i["idempotency"]
    print(f"  replays answered with the same booking: {idem['replaysSameBooking']} ok, "
          f"{idem['replayMismatches']} mismatched; concurrent duplicates: {idem['duplicatesAgreed']} agreed, "
          f"{idem['duplicatesDisagreed']} disagreed")
    if (h := r["hotTier"]) is not None:
        print(f"hot tier: capacity {h.get('capacity')}, sold {h.get('sold')}, "
              f"remaining {h.get('remaining')}, "
              f"tickets clients were told about {h['clientTickets']}: "
              + ("sold out exactly to capacity" if h["soldOut"] else "NOT sold out"))
    if (sale := r.get("sale")) is not None:
        print(f"sale (clients, from the first user's start): first booking at {sale['firstBookedS']} s, "
              f"last ticket sold at {sale['lastBookedS']} s: {sale['sellOutSeconds']} s, "
              f"{sale['bookings']} bookings ({sale['bookingsPerSecond']}/s); p95 of the "
              f"{sale['bookingRequestsDuringSale']} booking requests answered meanwhile "
              f"{sale['p95DuringSaleMs']:.0f} ms")
    verdict = {EXIT_OK: "OK", EXIT_SLO: "SLO MISSED", EXIT_INVARIANT: "INVARIANT FAILED"}[r["exitCode"]]
    print(f"result: {verdict} (exit {r['exitCode']})", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--spawn-rate", type=float,
                   help="users started per second (default: all of them, at most 100, per second)")
    p.add_argument("--state-dir", type=Path, help="where `boxoffice up` wrote cluster.json")
    p.add_argument("--gateway", action="append", default=[], metavar="URL",
                   help="a region's gateway (repeatable)")
    p.add_argument("--admin-token", help="operator token (the flash sale creates its event with it)")
    p.add_argument("--primary-dsn", action="append", default=[], metavar="NAME=DSN",
                   help="a shard primary's database, for the invariant check (repeatable)")
    p.add_argument("--hot-capacity", type=int, default=200, help="flash-sale tier capacity")
    p.add_argument("--hot-shard", help="put the flash-sale event on this shard (default: the "
                   "placement policy, the least loaded shard homed nearest the gateway's region)")
    p.add_argument("--replay-probability", type=float, default=0.2,
                   help="share of bookings the booking user posts a second time (must get the same booking)")
    p.add_argument("--cancel-probability", type=float, default=0.1,
                   help="share of bookings the booking user cancels")
    p.add_argument("--p95-ms", type=float, default=500.0, help="SLO: p95 limit on every endpoint")
    p.add_argument("--max-failure-ratio", type=float, default=0.01,
                   help="SLO: share of requests allowed to fail")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--report", type=Path, help="also write the report as JSON to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:12]
    reference_prefix = f"lt-{run_id}-"
    try:
        target = resolve_target(args)
        hot = (create_hot_event(target, args.hot_capacity, args.hot_shard, run_id)
               if args.scenario == "flash-sale" else None)
    except SetupError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return EXIT_SETUP
    locustfile.configure(target.gateways, hot, reference_prefix,
                         replay_probability=args.replay_probability,
                         cancel_probability=args.cancel_probability)
    print(f"scenario {args.scenario}: {args.users} users, {args.seconds:g} s, gateways "
          + ", ".join(f"{g.region} {g.url}" for g in target.gateways), flush=True)
    spawn_rate = args.spawn_rate or min(args.users, 100)
    run = run_load(SCENARIOS[args.scenario], args.users, spawn_rate, args.seconds, args.progress_every)
    try:
        db = check_databases(target, reference_prefix, [hot.tier_id] if hot else [])
    except SetupError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return EXIT_SETUP
    report = build_report(args, target, hot, run, db)
    print_summary(report)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return int(report["exitCode"])


if __name__ == "__main__":
    sys.exit(main())
