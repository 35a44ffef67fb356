"""`boxoffice`: the operator's command line.

  boxoffice up [--topology FILE]   start the local multi-region cluster (foreground)
  boxoffice down                   stop a cluster started by `boxoffice up`
  boxoffice map show               print the region map as tables
  boxoffice status                 the cluster's gateways and their health
  boxoffice shard promote SHARD --to REGION[/ZONE] [--force] [--json]
                                   emergency promotion of a shard copy
  boxoffice shard switchover SHARD --to REGION[/ZONE] [--json]
                                   planned switchover (writes held, not failed)
  boxoffice drill failover --shard S [--kind K] [--manual] [--json]
                                   a fault under booking load, and its report
  boxoffice drill chaos [--minutes N | --rounds N] [--seed S] [--json FILE]
                                   random operations and faults, healed, then checked
  boxoffice event create [SPEC.json] [--name N --venue V --starts-at T --tier NAME:CENTS:CAP ...]
                         [--shard S | --venue-region R] [--json]
                                   create an event with its tiers and place it
  boxoffice event list [--shard S] [--json]
                                   events per shard, joined with the map's placements
  boxoffice event move EVENT --to-shard S | --abort | --status [--json]
                                   move an event to another shard while it is on sale
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

from deploy.topology import DEFAULT_TOPOLOGY, load_topology


def default_state_dir() -> Path:
    """BOXOFFICE_STATE_DIR, else a directory no other user can take over first (not a
    predictable path in /tmp): root's /var/lib/boxoffice, a user's
    $XDG_STATE_HOME/boxoffice (~/.local/state/boxoffice). `up` refuses one another user
    made or may write (deploy/cluster.py `check_state_dir`)."""
    env = os.environ.get("BOXOFFICE_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/boxoffice")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "boxoffice"


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    from deploy.cluster import Cluster

    topology = load_topology(args.topology)
    if args.base_port is not None:
        topology = topology.with_base_port(args.base_port)
    state_dir: Path = args.state_dir
    existing = _read_state(state_dir)
    if existing and _pid_alive(existing["pid"]):
        _say(f"a cluster is already running (pid {existing['pid']}); `boxoffice down` stops it")
        return 1
    # --base-port 0: every port from the OS (for tests beside a running cluster).
    cluster = Cluster(topology, state_dir, base_port=topology.base_port or None, progress=_say)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _say(f"boxoffice: starting {topology.name}: {len(topology.regions)} regions x "
         f"{len(topology.shards)} shards (state in {state_dir})")
    started = time.monotonic()
    try:
        cluster.start()
    except KeyboardInterrupt:
        _say("interrupted; stopped everything")
        return 130
    except Exception as exc:
        _say(f"boxoffice: start failed: {exc}")
        return 1
    assert cluster.plan is not None
    _say("")
    _say(f"boxoffice is up in {time.monotonic() - started:.1f}s. Gateways:")
    for region in topology.region_names:
        _say(f"  {region:<10} {cluster.plan.gateway_url(region)}/")
    first = topology.region_names[0]
    _say(f"  console    {cluster.plan.gateway_url(first)}/admin/  (on every gateway; operator "
         f"token from {state_dir / 'cluster.json'})")
    _say(f"  consul     http://{cluster.consul.address if cluster.consul else '?'}/ui")
    if cluster.prometheus is not None:
        _say(f"  prometheus {cluster.prometheus.url}/alerts")
    _say(f"  operator token in {state_dir / 'cluster.json'}")
    _say("Stop with Ctrl-C or `boxoffice down`.")
    held: dict[str, str] = {}
    try:
        while not stop.wait(1.0):
            # One process dying does not take the cluster down: the node agents restart
            # what they own (Postgres, booking services); the launcher restarts its own,
            # except a host a drill holds down (failover/holddown.py) until it is released.
            now_held = cluster.held_down()
            for name in now_held.keys() - held.keys():
                _say(f"note: {name} held down ({now_held[name]}): not restarted until released")
            released, held = held.keys() - now_held.keys(), now_held
            for name in cluster.restart_dead():
                _say(f"note: {name} no longer held down; started it again" if name in released
                     else f"warning: {name} exited unexpectedly; started it again")
    finally:
        _say("stopping ...")
        cluster.stop()
        (state_dir / "cluster.json").unlink(missing_ok=True)
        _say(f"stopped {len(cluster.pids())} processes; nothing left running.")
    return 0


def _read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (an exited process its parent has not reaped yet is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmd_down(args: argparse.Namespace) -> int:
    state = _read_state(args.state_dir)
    if not state or not _pid_alive(state["pid"]):
        _say("no running cluster")
        return 0
    pid = state["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)  # poll until the `up` process has stopped its children
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        _say(f"cluster (pid {pid}) did not stop in 60s: killed")
        return 1
    _say(f"cluster (pid {pid}) stopped")
    return 0


def cmd_map_show(args: argparse.Namespace) -> int:
    from region_map import BOOKING_SERVICE, ConsulMapStore, passing_by_url

    state = _read_state(args.state_dir)
    consul = args.consul or (state["consul"] if state else "127.0.0.1:8500")
    prefix = state["mapPrefix"] if state else "boxoffice/"
    host, _, port = consul.rpartition(":")

    async def load():  # type: ignore[no-untyped-def]
        store = ConsulMapStore(host=host, port=int(port), prefix=prefix, token=_consul_token(state))
        try:
            _, instances = await store.watch_instances(BOOKING_SERVICE, 0)
            return await store.load(), passing_by_url(instances)
        finally:
            await store.close()

    region_map, health = asyncio.run(load())
    print(format_map(region_map, health))
    return 0


def format_map(region_map, health: dict[str, bool] | None = None) -> str:  # type: ignore[no-untyped-def]
    """The map as tables; with `health` ({copy URL: checks passing}), each copy of a
    shard shows its Consul health check: ok, FAILING, or ? when it is not registered."""

    def copy(shard, key: str) -> str:  # type: ignore[no-untyped-def]
        if health is None:
            return key
        passing = health.get(shard.members[key].service_url)
        return f"{key} ({'?' if passing is None else 'ok' if passing else 'FAILING'})"

    lines = [f"Region map (consul index {region_map.index})", "",
             "REGION      GATEWAY                      LOCATION"]
    for r in region_map.regions.values():
        lines.append(f"{r.name:<11} {r.gateway_url:<28} {r.location}")
    lines += ["", "SHARD       EPOCH  PRIMARY            REPLICAS"]
    for s in region_map.shards.values():
        replicas = ", ".join(copy(s, k) for k in sorted(s.members) if k != s.primary_copy)
        lines.append(f"{s.name:<11} {s.epoch:<6} {copy(s, s.primary_copy):<18} {replicas}")
    lines += ["", "EVENT                                 SHARD"]
    for event_id, shard in sorted(region_map.placements.items(), key=lambda kv: (kv[1], kv[0])):
        lines.append(f"{event_id}  {shard}")
    return "\n".join(lines)


def _get_json(url: str, token: str | None = None, timeout: float = 2.0) -> dict:
    """GET a JSON document; with the operator token, signed as the operator (an internal
    API: common/internal_auth.py; the token itself is not sent)."""
    from common.internal_auth import Signer

    headers = Signer.operator(token).sign("GET", url) if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        return dict(json.loads(resp.read()))


def cmd_status(args: argparse.Namespace) -> int:
    """Every process of the running cluster: gateways, node agents, and what each agent
    owns (its Postgres servers, in which role, and its booking service)."""
    state = _read_state(args.state_dir)
    if not state:
        _say("no running cluster")
        return 1
    token = state.get("adminToken")
    down = 0
    _say("GATEWAY     URL                          STATUS")
    for region, url in state["gateways"].items():
        try:
            _say(f"{region:<11} {url:<28} {_get_json(f'{url}/api/ready')['status']}")
        except OSError as exc:
            down += 1
            _say(f"{region:<11} {url:<28} DOWN ({exc.__class__.__name__})")
    _say("")
    _say("HOST          PROCESS                        PID      ROLE      MAP ROLE  EPOCH  RESTARTS")
    for host, url in (state.get("agents") or {}).items():
        try:
            doc = _get_json(f"{url}/agent/copies", token)
        except OSError as exc:
            down += 1
            _say(f"{host:<13} node agent {url}  DOWN ({exc.__class__.__name__})")
            continue
        service = doc.get("service") or {}
        _say(f"{host:<13} {'booking service':<30} {service.get('pid') or '-':<8} "
             f"{'running' if service.get('running') else 'STOPPED':<9} {'':<9} {'':<6} "
             f"{service.get('restarts', 0)}")
        for copy in doc.get("copies", []):
            running = copy.get("running")
            down += not running
            epoch = copy.get("epoch")
            _say(f"{host:<13} {'postgres ' + copy['name']:<30} {copy.get('pid') or '-':<8} "
                 f"{(copy.get('role') or '?') if running else 'STOPPED':<9} "
                 f"{copy.get('mapRole') or '?':<9} {'-' if epoch is None else epoch:<6} "
                 f"{copy.get('restarts', 0)}")
    return 1 if down else 0


def _consul_and_prefix(args: argparse.Namespace, state: dict | None) -> tuple[str, int, str]:
    consul = args.consul or (state["consul"] if state else "127.0.0.1:8500")
    host, _, port = consul.rpartition(":")
    return host, int(port), state["mapPrefix"] if state else "boxoffice/"


def _consul_token(state: dict | None) -> str | None:
    """Consul's management token: the one `up` kept in cluster.json, else None (the
    store then takes $BOXOFFICE_CONSUL_TOKEN; deploy/consul_acl.py)."""
    token = (state or {}).get("consulToken")
    return str(token) if token else None


def format_promote_step(event) -> str | None:  # type: ignore[no-untyped-def]
    """One progress line of `shard promote` (a failover.StepEvent)."""
    if event.state == "begin":
        return f"  {event.step:<9} {event.detail} ..."
    return f"  ok  {event.step:<9} ({event.seconds:.3f}s) {event.detail}"


def format_promote_report(report) -> str:  # type: ignore[no-untyped-def]
    """The summary printed after `shard promote` (a failover.PromoteReport)."""
    r = report
    if r.outcome == "already-primary":
        head = f"{r.shard}: {r.new_primary} is the primary already (epoch {r.new_epoch}); nothing to change"
    else:
        head = (f"{r.shard}: primary {r.old_primary} -> {r.new_primary}, epoch {r.old_epoch} -> "
                f"{r.new_epoch} (epoch LSN {r.epoch_lsn}) in {r.seconds:.2f}s"
                + (" (resumed: finished)" if r.outcome == "finished" else ""))
    lines = [head]
    if r.outcome != "already-primary":
        names = r.synchronous_standby_names
        lines.append(f"  synchronous standbys: {', '.join(r.sync_standbys) or 'none'}"
                     + (f"  [{names}]" if names else ""))
        if r.repointed or r.not_repointed:
            lines.append(f"  repointed to {r.new_primary}: {', '.join(r.repointed) or 'none'}"
                         + "".join(f"; not reached: {k} ({why})" for k, why in r.not_repointed.items()))
        if r.positions:
            lines.append("  positions before: " + ", ".join(
                f"{k} {v or '?'}" for k, v in sorted(r.positions.items())))
    if r.lost is not None:
        ahead = r.lost.get("ahead") or {}
        unheard = r.lost.get("notHeardFrom") or {}
        outside = " the candidate was not in the synchronous set;" if r.lost.get("notInSyncSet") else ""
        lines.append("  --force: what may be lost:" + outside)
        for key, info in ahead.items():
            lines.append(f"    {key} ({info['role']}) was {info['bytesAhead']} bytes of WAL ahead "
                         f"({info['position']} > {r.lost.get('candidatePosition')})")
        for key, why in unheard.items():
            lines.append(f"    {key} not heard from ({why}): it may hold what {r.new_primary} lacks")
        if not ahead and not unheard:
            lines.append("    nothing: every other copy answered and none was ahead")
    for note in r.notes:
        lines.append(f"  note: {note}")
    if r.old_primary_next:
        lines.append(f"  old primary {r.old_primary}: {r.old_primary_next}")
    return "\n".join(lines)


def _change_primary(args: argparse.Namespace, title: str, operation, format_report) -> int:  # type: ignore[no-untyped-def]
    """Run a change of primary (`operation(store, agents, shard, target, progress=...)`:
    failover.promote or failover.switchover) against the cluster in `args`, showing each
    step. Exit 0 done (or nothing to do), 1 refused (nothing changed, or rolled back),
    2 failed (a dependency; run it again to finish or roll back)."""
    from common.auth import ADMIN_TOKEN_ENV
    from failover import NodeAgents, PromoteFailed, PromoteRefused
    from region_map import ConsulMapStore

    state = _read_state(args.state_dir)
    host, port, prefix = _consul_and_prefix(args, state)
    token = os.environ.get(ADMIN_TOKEN_ENV) or (state or {}).get("adminToken")
    if not token:
        _say(f"no operator token: set {ADMIN_TOKEN_ENV} or run beside `boxoffice up`'s cluster.json")
        return 2

    def show(event) -> None:  # type: ignore[no-untyped-def]
        if not args.json:
            _say(format_promote_step(event) or "")

    async def run():  # type: ignore[no-untyped-def]
        store = ConsulMapStore(host=host, port=port, prefix=prefix, token=_consul_token(state))
        agents = NodeAgents(store, token)
        try:
            return await operation(store, agents, args.shard, args.to, progress=show)
        finally:
            await agents.close()
            await store.close()

    if not args.json:
        _say(title)
    try:
        report = asyncio.run(run())
    except (PromoteRefused, PromoteFailed) as exc:
        refused = isinstance(exc, PromoteRefused)
        if args.json:
            print(json.dumps({"outcome": "refused" if refused else "failed", "kind": exc.kind,
                              "detail": exc.detail, **exc.extra}, indent=2))
        else:
            _say(f"{'refused' if refused else 'FAILED'} ({exc.kind}): {exc.detail}")
        return 1 if refused else 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _say(format_report(report))
    return 0


def cmd_shard_promote(args: argparse.Namespace) -> int:
    """Emergency promotion (failover/promote.py)."""
    from functools import partial

    from failover import promote

    return _change_primary(
        args, f"promote {args.shard} to {args.to}{' (--force)' if args.force else ''}",
        partial(promote, force=args.force), format_promote_report)


def format_switchover_report(report) -> str:  # type: ignore[no-untyped-def]
    """The summary printed after `shard switchover` (a failover.switchover.SwitchoverReport)."""
    lines = [format_promote_report(report)]
    if report.writes_held_seconds is not None:
        lines.append(f"  writes held by the gateways for {report.writes_held_seconds:.3f}s "
                     "(transition to promotion)")
    return "\n".join(lines)


def cmd_shard_switchover(args: argparse.Namespace) -> int:
    """Planned switchover (failover/switchover.py)."""
    from failover.switchover import switchover

    return _change_primary(args, f"switchover {args.shard} to {args.to}", switchover,
                           format_switchover_report)


def cmd_drill_failover(args: argparse.Namespace) -> int:
    """A failover drill (failover/drill.py) against the running cluster: exit 0 when the
    fault led where the platform's rules say (a failover, or none when no copy may be
    promoted by itself) and nothing was lost, oversold or duplicated; 1 when something
    was; 2 when the drill could not run or finish (its message says why: e.g. no
    controller holds the lock, the switchover failed); 3 when nothing was lost but the
    outcome was not the expected one (the report says what happened instead)."""
    from failover.drill import DrillCluster, DrillError, DrillSettings, dumps, format_report, run_drill

    state = _read_state(args.state_dir)
    if not state or not _pid_alive(state["pid"]):
        _say("no running cluster (`boxoffice up` first: it restarts a killed host once the drill "
             "releases it)")
        return 2
    settings = DrillSettings(args.shard, args.kind, manual=args.manual)
    try:
        report = asyncio.run(run_drill(DrillCluster.from_state(args.state_dir, state), settings,
                                       None if args.json else _say))
    except DrillError as exc:
        _say(f"drill failed: {exc}")
        return 2
    print(dumps(report) if args.json else format_report(report), flush=True)
    return 0 if report["passed"] else 1 if not report["ok"] else 3


# -- events: `boxoffice event ...` (event_ops, the code the admin API runs too) ---------

def cmd_drill_chaos(args: argparse.Namespace) -> int:
    """The chaos drill (drills/chaos.py) against the running cluster: exit 0 when every
    round recovered and every check passed, 1 when something failed, 2 when the drill
    could not start."""
    import random

    from drills.chaos import ChaosTarget, format_verdict, run_chaos
    from drills.places import PlaceError
    from drills.schedule import ChaosError, ChaosSettings

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    rounds, minutes = args.rounds, args.minutes
    if rounds is None and minutes is None:
        minutes = 10.0
    try:
        settings = ChaosSettings(
            seed, rounds=rounds, minutes=minutes if rounds is None else None,
            **({"faults": tuple(f for f in args.faults.split(",") if f)} if args.faults is not None else {}),
            **({"operations": tuple(o for o in args.operations.split(",") if o)}
               if args.operations is not None else {}),
            round_seconds=args.round_seconds)
        settings.check()
        target = ChaosTarget.from_state(args.state_dir)
        report = asyncio.run(run_chaos(target, settings, _say))
    except (ChaosError, PlaceError) as exc:
        _say(f"chaos drill could not run (seed {seed}): {exc}")
        return 2
    _say(format_verdict(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        _say(f"report written to {args.json}")
    return 0 if report["ok"] else 1


def _operator_token(args: argparse.Namespace, state: dict | None) -> str | None:
    from common.auth import ADMIN_TOKEN_ENV

    token = os.environ.get(ADMIN_TOKEN_ENV) or (state or {}).get("adminToken")
    if not token:
        _say(f"no operator token: set {ADMIN_TOKEN_ENV} or run beside `boxoffice up`'s cluster.json")
    return token or None


def run_event_operation(args: argparse.Namespace, operation) -> object:  # type: ignore[no-untyped-def]
    """Run `operation(store, admin)` (an event_ops coroutine function) against the
    cluster in `args`: the region map in Consul, the booking services through
    `ShardAdmin` with the operator token. Returns its result; None when there is no
    token (said already)."""
    from event_ops.shard_admin import ShardAdmin
    from region_map import ConsulMapStore

    state = _read_state(args.state_dir)
    host, port, prefix = _consul_and_prefix(args, state)
    token = _operator_token(args, state)
    if token is None:
        return None

    async def run():  # type: ignore[no-untyped-def]
        store = ConsulMapStore(host=host, port=port, prefix=prefix, token=_consul_token(state))
        try:
            async with ShardAdmin(token) as admin:
                return await operation(store, admin)
        finally:
            await store.close()

    return asyncio.run(run())


def _tier_flag(text: str) -> dict:
    """`NAME:PRICE_CENTS:CAPACITY` (the name may contain colons)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not all(p.isascii() and p.isdigit() for p in parts[1:]):
        raise argparse.ArgumentTypeError(f"{text!r}: a tier is NAME:PRICE_CENTS:CAPACITY, e.g. GA:4500:200")
    return {"name": parts[0], "priceCents": int(parts[1]), "capacity": int(parts[2])}


def _event_request_body(args: argparse.Namespace) -> dict:
    """The create request: the spec file's JSON object, then the flags over it."""
    body: dict = {}
    if args.spec is not None:
        raw = sys.stdin.read() if str(args.spec) == "-" else Path(args.spec).read_text()
        loaded = json.loads(raw)
        if not isinstance(loaded, dict):
            raise ValueError("the spec must be a JSON object")
        body.update(loaded)
    flags = {"id": args.id, "name": args.name, "venue": args.venue, "startsAt": args.starts_at,
             "currency": args.currency, "shard": args.shard, "venueRegion": args.venue_region}
    body.update({k: v for k, v in flags.items() if v is not None})
    if args.tier:
        body["tiers"] = args.tier
    if args.unlisted:
        body["unlisted"] = True
    return body


def format_created_event(created) -> str:  # type: ignore[no-untyped-def]
    """What `event create` prints (an event_ops.create.CreatedEvent)."""
    e = created.event
    why = (f"{created.choice.reason}; {created.choice.placed_events} events placed on it before"
           if created.choice else "its placement existed: this finished an earlier creation")
    lines = [f"created event {e['id']} {e.get('name')!r} at {e.get('venue')!r}, {e.get('startsAt')}"
             + (" (unlisted)" if e.get("unlisted") else ""),
             f"  on {created.shard} (primary in {created.home_region}; {why})",
             "", f"  {'TIER':<24} {'ID':<36}  {'PRICE':>12}  {'CAPACITY':>8}"]
    for t in e.get("tiers", []):
        price = f"{t['priceCents'] / 100:.2f} {e.get('currency', '')}"
        lines.append(f"  {t['name']:<24} {t['id']:<36}  {price:>12}  {t['capacity']:>8}")
    return "\n".join(lines)


def cmd_event_create(args: argparse.Namespace) -> int:
    """Create an event and place it (event_ops/create.py). Exit 0 created, 1 refused
    (nothing created), 2 failed (a dependency; with `placed`, run it again to finish)."""
    from event_ops.create import CreateError, CreateFailed, create_event, parse_create_request

    try:
        request = parse_create_request(_event_request_body(args))
    except (OSError, ValueError) as exc:
        _say(f"cannot read the event spec: {exc}")
        return 2
    except CreateError as exc:
        return _event_refusal(args, exc, isinstance(exc, CreateFailed))
    if not args.json:
        tiers = len(request.spec.tiers)
        _say(f"creating event {request.spec.id} ({tiers} tier{'s' if tiers != 1 else ''}) ...")
    try:
        created = run_event_operation(args, lambda store, admin: create_event(store, admin, request))
    except CreateError as exc:
        return _event_refusal(args, exc, isinstance(exc, CreateFailed))
    if created is None:
        return 2
    print(json.dumps(created.to_json(), indent=2) if args.json else format_created_event(created),
          flush=True)
    return 0


def _event_refusal(args: argparse.Namespace, exc, failed: bool) -> int:  # type: ignore[no-untyped-def]
    """Say why an event operation did not happen (an exception with `kind`, `detail` and
    `extra`): exit 1 refused (nothing changed), 2 failed (run it again to finish)."""
    if args.json:
        print(json.dumps({"outcome": "failed" if failed else "refused", "kind": exc.kind,
                          "detail": exc.detail, **exc.extra}, indent=2), flush=True)
    else:
        _say(f"{'FAILED' if failed else 'refused'} ({exc.kind}): {exc.detail}")
        for error in exc.extra.get("errors", []):
            if error.get("detail") != exc.detail:
                _say(f"  {error.get('field')}: {error.get('detail')}")
    return 2 if failed else 1


def format_event_listing(listing) -> str:  # type: ignore[no-untyped-def]
    """What `event list` prints (an event_ops.listing.EventListing)."""
    lines = [f"Events per shard (region map index {listing.map_index})"]
    for s in listing.shards:
        counts = ", ".join(f"{n} {status}" for status, n in s.to_json()["counts"].items() if n)
        lines += ["", f"{s.shard}  primary {s.primary} ({counts or 'no events'})"]
        if s.unreadable:
            lines.append(f"  UNREADABLE: {s.unreadable}")
        if s.events:
            lines.append(f"  {'EVENT':<36}  {'STATUS':<28} {'STARTS':<20}  NAME")
        for e in s.events:
            status = f"{e.status}" + (f" ({e.placed_on})" if e.status == "placed-elsewhere" else "")
            lines.append(f"  {e.id:<36}  {status:<28} {e.starts_at or '-':<20}  {e.name or '-'}")
    return "\n".join(lines)


def cmd_event_list(args: argparse.Namespace) -> int:
    """Events per shard (event_ops/listing.py). Exit 0; 1 for an unknown shard; 2 when
    the map or a shard's primary could not be read (the rest is still printed)."""
    from event_ops.listing import UnknownShard, list_events
    from region_map import MapError

    async def listing(store, admin):  # type: ignore[no-untyped-def]
        return await list_events(admin, await store.load(), args.shard)

    try:
        result = run_event_operation(args, listing)
    except UnknownShard as exc:
        _say(str(exc))
        return 1
    except MapError as exc:
        _say(f"the region map could not be read: {exc}")
        return 2
    if result is None:
        return 2
    print(json.dumps(result.to_json(), indent=2) if args.json else format_event_listing(result),
          flush=True)
    return 2 if any(s.unreadable for s in result.shards) else 0


MOVE_KILL_AFTER_ENV = "BOXOFFICE_MOVE_KILL_AFTER"  # a test failpoint (tests/test_event_move.py)


def format_move_step(p) -> str:  # type: ignore[no-untyped-def]
    """One progress line of `event move` (an event_ops.move.MoveProgress)."""
    if p.state == "begin":
        return f"  {p.step:<10} {p.detail} ..." if p.detail else f"  {p.step:<10} ..."
    return f"  ok  {p.step:<10} ({p.seconds:.3f}s) {p.detail}"


def format_move_report(r) -> str:  # type: ignore[no-untyped-def]
    """The summary printed after `event move` (an event_ops.move.MoveReport)."""
    if r.outcome == "already-there":
        return f"event {r.event_id} is on {r.target} already; nothing to move"
    pause = f"{r.pause_seconds * 1000:.0f} ms" if r.pause_seconds is not None else "?"
    return "\n".join([
        f"event {r.event_id} moved {r.source} -> {r.target}"
        + (" (resumed: finished)" if r.outcome == "resumed" else "") + f" in {r.seconds:.2f}s",
        f"  writes paused {pause} (freeze to activation); other events never paused",
        f"  {r.bookings_copied} bookings copied in {r.pages} pages, {r.rounds} rounds"
        + (" (copied again in full after a digest mismatch)" if r.full_recopy else ""),
        f"  placement sinceLsn {r.since_lsn}: gateways read the event from a {r.target} copy "
        "once it has replayed that far",
        f"  move {r.move_id}; {r.source} keeps a tombstone that sends stale routes to {r.target}",
    ])


def cmd_event_move(args: argparse.Namespace) -> int:
    """Move an event (event_ops/move.py), resume its move, abort it, or show it. Exit 0
    moved (or nothing to do), 1 refused or rolled back (the event stays where it was),
    2 failed part-way (run it again to finish it)."""
    from event_ops.move import MoveFailed, MoveRefused, move_event, move_status

    if args.status:
        doc = run_event_operation(args, lambda store, _: move_status(store, args.event))
        if doc is None:
            return 2
        print(json.dumps(doc, indent=2), flush=True)
        return 0
    if not args.abort and not args.to_shard:
        _say("name the shard: --to-shard SHARD (or --abort, --status)")
        return 1

    def show(p) -> None:  # type: ignore[no-untyped-def]
        if not args.json:
            _say(format_move_step(p))

    fault_hook = None
    if kill_after := os.environ.get(MOVE_KILL_AFTER_ENV):
        async def fault_hook(step: str) -> None:
            if step == kill_after:  # die as a crash would, right after the step's journal
                os.kill(os.getpid(), signal.SIGKILL)

    if not args.json:
        _say(f"{'aborting the move of' if args.abort else 'moving'} event {args.event}"
             + (f" to {args.to_shard}" if args.to_shard and not args.abort else ""))
    try:
        report = run_event_operation(args, lambda store, admin: move_event(
            store, admin, args.event, args.to_shard, abort=args.abort, progress=show,
            fault_hook=fault_hook, owner="boxoffice event move", lease_ttl=args.lease_ttl))
    except (MoveRefused, MoveFailed) as exc:
        return _event_refusal(args, exc, isinstance(exc, MoveFailed))
    except ValueError:
        _say(f"{args.event!r} is not an event id")
        return 1
    if report is None:
        return 2
    print(json.dumps(report.to_json(), indent=2) if args.json else format_move_report(report),
          flush=True)
    return 0


def add_event_commands(sub) -> argparse._SubParsersAction:  # type: ignore[no-untyped-def]
    """`boxoffice event ...`; returns its subcommands, for more to be added."""
    event_cmd = sub.add_parser("event", help="create and list events")
    event_sub = event_cmd.add_subparsers(dest="event_command", required=True)
    create = event_sub.add_parser(
        "create", help="create an event with its tiers and place it on a shard",
        description="The spec (a JSON file, - for stdin) and the flags are merged, flags winning. "
                    "Without --shard the event goes to the shard homed nearest --venue-region "
                    "(least loaded first), or to the least loaded shard.")
    create.add_argument("spec", nargs="?", default=None, metavar="SPEC.json",
                        help='{"name", "venue", "startsAt", "currency", "tiers": [...], ...}')
    create.add_argument("--id", help="the event's id (a UUID; default: a new one)")
    create.add_argument("--name")
    create.add_argument("--venue")
    create.add_argument("--starts-at", metavar="ISO8601", help="e.g. 2027-12-01T20:00:00Z")
    create.add_argument("--currency", metavar="XXX")
    create.add_argument("--tier", action="append", type=_tier_flag, metavar="NAME:PRICE_CENTS:CAPACITY",
                        help="a tier (repeat for more); replaces the spec's tiers")
    create.add_argument("--shard", help="the shard to place it on")
    create.add_argument("--venue-region", metavar="REGION", help="the venue's region (default policy)")
    create.add_argument("--unlisted", action="store_true",
                        help="never in the public listing (drills, tests); bookable by id")
    create.add_argument("--json", action="store_true", help="print the event (or refusal) as JSON")
    create.add_argument("--consul", default=None)
    create.set_defaults(func=cmd_event_create)
    lst = event_sub.add_parser("list", help="events per shard, joined with the map's placements")
    lst.add_argument("--shard", help="only this shard")
    lst.add_argument("--json", action="store_true", help="print the listing as JSON")
    lst.add_argument("--consul", default=None)
    lst.set_defaults(func=cmd_event_list)
    move = event_sub.add_parser(
        "move", help="move an event to another shard while it is on sale",
        description="Runs the move (docs/moves.md), showing each step, or resumes an unfinished "
                    "one; --abort rolls an unfinished move back (before its flip only); --status "
                    "shows the placement and the last move's journal.")
    move.add_argument("event", metavar="EVENT", help="the event's id")
    move.add_argument("--to-shard", metavar="SHARD")
    move.add_argument("--abort", action="store_true", help="roll back an unfinished move")
    move.add_argument("--status", action="store_true", help="print the move's journal and side")
    move.add_argument("--json", action="store_true", help="print the report as JSON")
    move.add_argument("--lease-ttl", type=float, default=None, metavar="SECONDS",
                      help="the move's lease TTL (a runner that dies blocks the next for ~2x it)")
    move.add_argument("--consul", default=None)
    move.set_defaults(func=cmd_event_move)
    return event_sub


def main(argv: list[str] | None = None) -> int:
    from common.connections import raise_fd_limit
    raise_fd_limit()  # every process `up` or a drill starts inherits it (see tests/conftest.py)
    parser = argparse.ArgumentParser(prog="boxoffice", description="boxoffice operator CLI")
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local multi-region cluster")
    up.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    up.add_argument("--base-port", type=int, default=None)
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the cluster started by `up`").set_defaults(func=cmd_down)
    sub.add_parser("status", help="gateway health").set_defaults(func=cmd_status)
    map_cmd = sub.add_parser("map", help="the region map")
    map_sub = map_cmd.add_subparsers(dest="map_command", required=True)
    show = map_sub.add_parser("show", help="print the map")
    show.add_argument("--consul", default=None)
    show.set_defaults(func=cmd_map_show)
    shard_cmd = sub.add_parser("shard", help="change a shard's copies")
    shard_sub = shard_cmd.add_subparsers(dest="shard_command", required=True)
    prom = shard_sub.add_parser("promote", help="emergency promotion of a copy to primary")
    prom.add_argument("shard")
    prom.add_argument("--to", required=True, metavar="REGION[/ZONE]", help="the copy to promote")
    prom.add_argument("--force", action="store_true",
                      help="promote even when the copy may lack confirmed bookings (reports what)")
    prom.add_argument("--json", action="store_true", help="print the report as JSON")
    prom.add_argument("--consul", default=None)
    prom.set_defaults(func=cmd_shard_promote)
    swo = shard_sub.add_parser("switchover", help="planned switchover to a synchronous standby")
    swo.add_argument("shard")
    swo.add_argument("--to", required=True, metavar="REGION[/ZONE]",
                     help="the copy to make primary (a synchronous standby)")
    swo.add_argument("--json", action="store_true", help="print the report as JSON")
    swo.add_argument("--consul", default=None)
    swo.set_defaults(func=cmd_shard_switchover)
    drill_cmd = sub.add_parser("drill", help="failover drills under booking load")
    drill_sub = drill_cmd.add_subparsers(dest="drill_command", required=True)
    drill = drill_sub.add_parser("failover", help="cause a fault under load and report on it")
    drill.add_argument("--shard", required=True)
    drill.add_argument("--kind", default="kill-primary",
                       choices=["kill-primary", "kill-zone", "kill-region", "switchover"])
    drill.add_argument("--manual", action="store_true",
                       help="pause the controllers; the drill detects and promotes itself")
    drill.add_argument("--json", action="store_true", help="print the report as JSON")
    drill.set_defaults(func=cmd_drill_failover)
    chaos = drill_sub.add_parser(
        "chaos", help="random operations and faults under load, then heal and check",
        description="Seeded rounds of operations (switchover, event move, event create, controller "
                    "kill) and faults (kill -9 of a runner, node agent, Postgres, booking service or "
                    "controller; SIGSTOP of a runner past its lease or of a standby's WAL receiver; "
                    "Consul paused; a host's links cut) under booking load through every gateway; then "
                    "everything is healed and checked (docs/failover.md, Chaos drill).")
    chaos.add_argument("--minutes", type=float, default=None, help="start rounds for this long (default 10)")
    chaos.add_argument("--rounds", type=int, default=None, help="run this many rounds instead")
    chaos.add_argument("--seed", type=int, default=None,
                       help="replay a schedule (default: a new seed, printed)")
    chaos.add_argument("--json", default=None, metavar="FILE", help="write the report there as JSON")
    chaos.add_argument("--faults", default=None, metavar="A,B", help="only these fault kinds")
    chaos.add_argument("--operations", default=None, metavar="A,B", help="only these operations")
    chaos.add_argument("--round-seconds", type=float, default=15.0, help="each round's length (default 15)")
    chaos.set_defaults(func=cmd_drill_chaos)
    add_event_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
