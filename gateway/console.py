"""The operator console: `/admin/` on every gateway, a live picture of the cluster.

    GET  /admin/                 the console page (gateway/static/console.html, .js, .css)
    GET  /admin/api/state        what the page draws, as JSON (polled about once a second)
    GET  /operator/login         the sign-in form (no cluster content)
    POST /operator/login         token=<operator token>: 204 with the session cookie, or 403;
                                 429 + Retry-After beyond `LOGIN_BURST` tries per address
    POST /admin/logout           revokes this browser's session for the whole cluster
    POST /operator/logout        clears the session cookie (the console's older sign-out)

Everything under `/admin` is authenticated before routing (common/auth.py): with
`Authorization: Bearer <token>` (curl, a proxy that adds it), or, for the console's own
routes only, with the browser session cookie the sign-in form sets
(common/operator_session.py: audience-bound MAC, HttpOnly, SameSite=Strict, GET/HEAD
only, revocable). Without either the page is a 401 problem document and nothing of the
console is sent. The sign-in form lives outside `/admin` so it can be reached at all; it
shows nothing of the cluster. Sign-in attempts are throttled per client address
(`LoginThrottle`: every try takes a token, success or not, so a guesser learns nothing
from which tries are refused). Signing out records the session id in the cluster's
Consul (`ConsulRevocations`, a journal `console-session-revoked-<id>` until the session's
expiry), so every gateway refuses the cookie from then on, even a copy of it.

What the state holds, and where it comes from (the gateway has no SQL):
- the region map: this gateway's in-memory copy (`MapWatcher`), its index;
- each copy's health: Consul's checks of its booking-service instance (`HealthWatcher`,
  in memory);
- each copy's actual role, running state, WAL positions, timeline and epoch row: its
  host's node agent (`GET /agent/copies`, signed as the operator, found as `node-agent` in the
  registry, 1 s timeout); a standby's lag in bytes is its primary's WAL position minus
  its replay position, both read in the same round;
- operations in progress: the shards' transitions (map), the operation journals
  (`promote-*`, `switchover-*` under the ops prefix, with their phase) and the holders
  of the shards' operation leases (`shard-op-<shard>`);
- the failover controller: the holder of the controller lock and its `/status`
  (suspects, promotions in flight, its recent failovers);
- the last drill reports: failover/drill.py keeps each one as `drill-<shard>-<kind>`
  beside the journals (the latest of each shard and kind);
- events: what changed between two rounds (primary, epoch, a copy's state, an
  operation's phase), kept in memory by this gateway while someone watches.

Cost: nothing runs while no console is open. A round is computed at most once per
`REFRESH_SECONDS` however many consoles poll (one round at a time, the others wait for
its result): one registry read, one `GET /agent/copies` per host, one journal listing,
one lease read per shard, one controller lock read and one `/status`.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from common import internal_auth, operator_session
from common.auth import CONSOLE_SESSIONS
from common.lsn import optional_lsn_to_int
from common.problems import Problem
from failover.agents import HOST_TAG
from failover.leadership import CONTROLLER_LOCK
from failover.lease import shard_lock
from region_map import (
    NODE_AGENT_SERVICE,
    CasConflict,
    HealthWatcher,
    MapError,
    MapStore,
    MapWatcher,
    NotFound,
    RegionMap,
    Shard,
)

log = logging.getLogger("boxoffice.gateway")

STATIC_DIR = Path(__file__).with_name("static")
REFRESH_SECONDS = 0.8  # a round's result serves every console polling within this time
CALL_TIMEOUT = 1.0  # one node agent, the controller's /status
ROUND_TIMEOUT = 2.5  # one Consul read of a round
DRILL_KIND = "drill-"  # failover/drill.py saves its reports under this journal kind
OPERATION_KINDS = ("promote-", "switchover-")
MAX_EVENTS = 300
MAX_TOKEN_LENGTH = 1024
PAGE_HEADERS = {  # the console's own files: no framing, no other origin, never cached
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def copy_state(map_role: str, agent: dict[str, Any] | None, health: str) -> str:
    """One word for a copy, worst first: `unreachable` (its node agent does not answer),
    `stopped` (its Postgres is not running), `starting` (running, role not known yet),
    `wrong-role` (the database's role is not the map's), `failing` (Consul's checks of
    its booking service fail), `not-streaming` (a standby with no WAL receiver), `ok`."""
    if agent is None:
        return "unreachable"
    if not agent.get("running"):
        return "stopped"
    role = agent.get("role")
    if role is None:
        return "starting"
    if role != ("primary" if map_role == "primary" else "standby"):
        return "wrong-role"
    if health == "failing":
        return "failing"
    if role == "standby" and not (agent.get("positions") or {}).get("streaming"):
        return "not-streaming"
    return "ok"


def _position(agent: dict[str, Any] | None) -> int | None:
    """A primary's WAL write position; a standby's replay position."""
    if not agent or not agent.get("running"):
        return None
    pos = agent.get("positions") or {}
    if agent.get("role") == "primary":
        return optional_lsn_to_int(pos.get("current_lsn") or pos.get("flush_lsn"))
    return optional_lsn_to_int(pos.get("replay_lsn"))


def shard_view(shard: Shard, events: int, agents: dict[str, dict[str, Any]],
               health: Callable[[str], str]) -> dict[str, Any]:
    """One shard as the page draws it: the record, and every copy with what its agent and
    Consul say. `agents`: {host key: the agent's document of its copy of this shard}."""
    primary_pos = _position(agents.get(shard.primary_copy))
    copies = []
    for key, member in sorted(shard.members.items(), key=lambda kv: (kv[0] != shard.primary_copy, kv[0])):
        agent = agents.get(key)
        map_role = "primary" if key == shard.primary_copy else "replica"
        checks = health(member.service_url)
        pos = agent.get("positions") if agent else None
        lag = None
        if map_role == "replica" and primary_pos is not None and (mine := _position(agent)) is not None:
            lag = max(0, primary_pos - mine)
        copies.append({
            "key": key, "region": member.region, "zone": member.zone, "mapRole": map_role,
            "syncStandby": key in shard.sync_standbys,
            "state": copy_state(map_role, agent, checks), "health": checks,
            "agentReachable": agent is not None,
            "running": None if agent is None else bool(agent.get("running")),
            "role": None if agent is None else agent.get("role"),
            "epoch": None if agent is None else agent.get("epoch"),
            "timeline": None if agent is None else agent.get("timeline"),
            "streaming": bool(pos and pos.get("streaming")),
            "lsn": None if not pos else (pos.get("replay_lsn") if map_role == "replica"
                                         else pos.get("current_lsn") or pos.get("flush_lsn")),
            "lagBytes": lag,
            "operatorStopped": bool(agent and agent.get("operatorStopped")),
        })
    transition = shard.transition
    return {
        "name": shard.name, "epoch": shard.epoch, "primary": shard.primary_copy,
        "primaryRegion": shard.primary_region, "syncMode": shard.sync_mode,
        "syncStandbys": list(shard.sync_standbys), "epochLsn": shard.epoch_lsn,
        "transition": None if transition is None else
        {**transition.to_json(), "ageSeconds": round(transition.age_seconds(), 1)},
        "events": events, "copies": copies,
    }


@dataclass
class _Round:
    at: float
    doc: dict[str, Any]


class ConsoleState:
    """Collects the console's state on demand, at most once per `REFRESH_SECONDS`."""

    def __init__(self, region: str, store: MapStore, watcher: MapWatcher,
                 health: HealthWatcher | None, token: str) -> None:
        self.region = region
        self.store = store
        self.watcher = watcher
        self.health = health
        self.token = token
        self._signer = internal_auth.Signer.operator(token) if token else None
        self._session: aiohttp.ClientSession | None = None
        self._last: _Round | None = None
        self._lock = asyncio.Lock()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self._seen: dict[str, str] | None = None  # what the last round said, to tell changes

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def state(self) -> dict[str, Any]:
        async with self._lock:  # one round at a time; the others use its result
            if self._last is None or time.monotonic() - self._last.at > REFRESH_SECONDS:
                doc = await self._collect()
                self._last = _Round(time.monotonic(), doc)
            return self._last.doc

    # -- one round -------------------------------------------------------------------------
    async def _collect(self) -> dict[str, Any]:
        region_map = self.watcher.current
        shards = sorted(region_map.shards) if region_map else []
        agents, journals, leases, controller = await asyncio.gather(
            self._agents(), self._journals(), self._leases(shards), self._controller())
        errors = [e for e in (agents.get("error"), journals.get("error"), controller.get("error")) if e]
        doc: dict[str, Any] = {
            "generatedAt": _now_iso(),
            "gateway": {"region": self.region, "mapLoaded": region_map is not None,
                        "mapIndex": region_map.index if region_map else None,
                        "consulReachable": self.watcher.healthy},
            "regions": [], "shards": [],
            "agents": {h: {"passing": a["passing"], "reachable": a["copies"] is not None}
                       for h, a in agents.get("hosts", {}).items()},
            "operations": [], "controller": controller.get("status"),
            "drills": journals.get("drills", []),
            "drillsSaved": "drills" in journals,
            "errors": errors,
        }
        if region_map is not None:
            doc["regions"] = [{"name": r.name, "location": r.location, "gatewayUrl": r.gateway_url}
                              for r in sorted(region_map.regions.values(), key=lambda r: r.name)]
            counts = collections.Counter(region_map.placements.values())
            for name in shards:
                shard = region_map.shards[name]
                by_host = {h: a["copies"][name] for h, a in agents.get("hosts", {}).items()
                           if a["copies"] is not None and name in a["copies"]}
                doc["shards"].append(shard_view(shard, counts[name], by_host, self._health))
            doc["operations"] = _operations(region_map, journals.get("operations", []), leases)
        self._note_changes(doc)
        doc["events"] = list(self.events)
        return doc

    def _health(self, service_url: str) -> str:
        if self.health is None:
            return "unknown"
        for instance in self.health.instances:
            if instance.url == service_url:
                return "passing" if instance.passing else "failing"
        return "unregistered"

    async def _agents(self) -> dict[str, Any]:
        """{"hosts": {host: {"passing", "url", "copies": {shard: doc} or None}}}."""
        try:
            async with asyncio.timeout(ROUND_TIMEOUT):
                _, instances = await self.store.watch_instances(NODE_AGENT_SERVICE, 0)
        except (MapError, TimeoutError) as exc:
            return {"error": f"service registry: {exc.__class__.__name__}"}
        hosts: dict[str, dict[str, Any]] = {}
        for inst in instances:
            host = next((t[len(HOST_TAG):] for t in inst.tags if t.startswith(HOST_TAG)), None)
            if host and (host not in hosts or (inst.passing and not hosts[host]["passing"])):
                url = (inst.url or f"http://{inst.address}:{inst.port}").rstrip("/")
                hosts[host] = {"passing": inst.passing, "url": url, "copies": None}
        docs = await asyncio.gather(*(self._get(h["url"] + "/agent/copies") for h in hosts.values()))
        for entry, got in zip(hosts.values(), docs, strict=True):
            if got is not None:
                entry["copies"] = {str(c.get("shard")): c for c in got.get("copies") or []
                                   if isinstance(c, dict)}
        return {"hosts": hosts}

    async def _journals(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(ROUND_TIMEOUT):
                found = await self.store.list_journals("")
        except (MapError, TimeoutError) as exc:
            return {"error": f"journals: {exc.__class__.__name__}"}
        operations = [{"id": op_id, **doc} for op_id, (doc, _) in sorted(found.items())
                      if op_id.startswith(OPERATION_KINDS)]
        drills = [_drill_summary(doc) for op_id, (doc, _) in found.items() if op_id.startswith(DRILL_KIND)]
        drills.sort(key=lambda d: str(d.get("startedAt") or ""), reverse=True)
        return {"operations": operations, "drills": drills[:10]}

    async def _leases(self, shards: list[str]) -> dict[str, str]:
        """{shard: who holds its operation lease}, for the shards whose lease is held."""
        async def one(name: str) -> str | None:
            try:
                async with asyncio.timeout(ROUND_TIMEOUT):
                    state = await self.store.lock_holder(shard_lock(name))
            except (MapError, TimeoutError):
                return None
            return str((state.value or {}).get("owner", "?")) if state.session else None
        held = await asyncio.gather(*(one(s) for s in shards))
        return {s: h for s, h in zip(shards, held, strict=True) if h is not None}

    async def _controller(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(ROUND_TIMEOUT):
                state = await self.store.lock_holder(CONTROLLER_LOCK)
        except (MapError, TimeoutError) as exc:
            return {"error": f"controller lock: {exc.__class__.__name__}"}
        if state.session is None:
            return {"status": {"active": None, "detail": "no failover controller holds the lock: "
                               "a dead primary is not replaced automatically"}}
        holder = state.value or {}
        status: dict[str, Any] = {"active": str(holder.get("region") or holder.get("owner") or "?")}
        url = holder.get("status")
        got = await self._get(str(url)) if isinstance(url, str) and url.startswith("http") else None
        if got is None:
            status["detail"] = "its /status did not answer"
        else:
            status.update({k: got.get(k) for k in ("inProgress", "suspects", "lastFailover",
                                                   "consulReachable", "lastError")})
            status["history"] = (got.get("history") or [])[-20:]
        return {"status": status}

    async def _get(self, url: str) -> dict[str, Any] | None:
        """GET a JSON document, signed as the operator (common/internal_auth.py: the token
        itself is never sent, these addresses come from Consul); None when it does not answer."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            target = URL(url)
            headers = self._signer.sign("GET", target) if self._signer is not None else {}
            async with self._session.get(target, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)) as resp:
                if resp.status != 200:
                    return None
                doc = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    # -- events: what changed since the last round ---------------------------------------------
    def _note_changes(self, doc: dict[str, Any]) -> None:
        seen: dict[str, str] = {}
        said: dict[str, tuple[str, str]] = {}  # key -> (shard, text)
        for shard in doc["shards"]:
            name = shard["name"]
            seen[f"{name}:primary"] = f"{shard['primary']}@{shard['epoch']}"
            said[f"{name}:primary"] = (name, f"primary {shard['primary']} at epoch {shard['epoch']}")
            t = shard["transition"]
            seen[f"{name}:transition"] = f"{t['kind']}->{t['target']}" if t else ""
            said[f"{name}:transition"] = (name, f"{t['kind']} to {t['target']} begins" if t
                                          else "no transition under way")
            for c in shard["copies"]:
                key = f"{name}:copy:{c['key']}"
                seen[key] = c["state"]
                said[key] = (name, f"{c['key']} ({c['mapRole']}) is {c['state']}")
        for op in doc["operations"]:
            if op["source"] == "journal":
                key = f"{op['shard']}:op:{op['id']}"
                seen[key] = str(op.get("phase"))
                said[key] = (op["shard"], f"{op['op']} to {op.get('target')}: {op.get('phase')}")
        previous = self._seen
        self._seen = seen
        if previous is None:
            return  # the first round: a baseline, not a change
        at = doc["generatedAt"]
        for key, value in seen.items():
            if previous.get(key) != value and (value or key in previous):
                shard, text = said[key]
                self.events.append({"at": at, "shard": shard, "text": text})
        for key in previous.keys() - seen.keys():
            if ":op:" in key:
                shard, _, rest = key.partition(":op:")
                self.events.append({"at": at, "shard": shard, "text": f"{rest} finished (journal removed)"})


def _operations(region_map: RegionMap, journals: list[dict[str, Any]],
                leases: dict[str, str]) -> list[dict[str, Any]]:
    """What is changing now: transitions in the map, journals, held operation leases."""
    ops: list[dict[str, Any]] = []
    for name, shard in sorted(region_map.shards.items()):
        if shard.transition is not None:
            t = shard.transition
            ops.append({"source": "map", "shard": name, "op": t.kind, "target": t.target,
                        "from": shard.primary_copy, "phase": "writes held",
                        "startedAt": t.since, "ageSeconds": round(t.age_seconds(), 1)})
    for doc in journals:
        ops.append({"source": "journal", "id": doc["id"], "shard": str(doc.get("shard", "?")),
                    "op": str(doc.get("op") or doc["id"].split("-", 1)[0]),
                    "target": doc.get("target"), "from": doc.get("from"),
                    "fromEpoch": doc.get("fromEpoch"), "newEpoch": doc.get("newEpoch"),
                    "phase": doc.get("phase"), "startedAt": doc.get("startedAt"),
                    "repointed": doc.get("repointed") or []})
    for name, owner in sorted(leases.items()):
        ops.append({"source": "lease", "shard": name, "op": "lease", "holder": owner})
    return ops


def _drill_summary(doc: dict[str, Any]) -> dict[str, Any]:
    times = doc.get("times") or {}
    writes = doc.get("writes") or {}
    bookings = doc.get("bookings") or {}
    return {
        "shard": doc.get("shard"), "kind": doc.get("kind"), "mode": doc.get("mode"),
        "startedAt": doc.get("startedAt"), "ok": doc.get("ok"),
        "oldPrimary": doc.get("oldPrimary"), "newPrimary": doc.get("newPrimary"),
        "oldEpoch": doc.get("oldEpoch"), "newEpoch": doc.get("newEpoch"),
        "detectSeconds": times.get("detectSeconds"), "promoteSeconds": times.get("promoteSeconds"),
        "writesBackSeconds": times.get("writesBackSeconds"),
        "longestGapSeconds": writes.get("longestGapSeconds"),
        "confirmed": bookings.get("confirmed"), "missing": bookings.get("missing"),
        "oversold": bookings.get("oversold"),
        "duplicatedReferences": bookings.get("duplicatedReferences"),
        "clientErrors": doc.get("clientErrors") or {},
    }


# -- routes ------------------------------------------------------------------------------------

CONSOLE = web.AppKey("console", ConsoleState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _file(name: str) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / name, headers=PAGE_HEADERS)
    return handler


async def _state(request: web.Request) -> web.Response:
    return web.json_response(await request.app[CONSOLE].state(), headers={"Cache-Control": "no-store"})


REVOKED_KIND = "console-session-revoked-"  # journal kind of a signed-out session
LOGIN_BURST = 10  # sign-in tries an address may make at once ...
LOGIN_REFILL_SECONDS = 1.0  # ... and one more every this many seconds
LOGIN_ADDRESSES = 10_000  # addresses remembered at most (the oldest are forgotten)


class ConsulRevocations:
    """Signed-out console sessions, recorded in the cluster's Consul until they expire."""

    def __init__(self, store: MapStore) -> None:
        self.store = store

    async def revoke(self, session: operator_session.Session) -> None:
        try:
            await self.store.put_journal(REVOKED_KIND + session.id, {"expires": session.expires}, 0)
        except CasConflict:
            pass  # revoked already
        await self._forget_expired()

    async def is_revoked(self, session_id: str) -> bool:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await self.store.read_journal(REVOKED_KIND + session_id)
        except NotFound:
            return False
        return True

    async def _forget_expired(self) -> None:
        """Drop the records of sessions that have expired anyway (best effort)."""
        try:
            found = await self.store.list_journals(REVOKED_KIND)
            for op_id, (doc, index) in found.items():
                expires = doc.get("expires")
                if isinstance(expires, int) and expires < time.time():
                    await self.store.delete_journal(op_id, index)
        except (MapError, CasConflict) as exc:
            log.info("could not prune revoked console sessions", extra={"error": str(exc)})


class LoginThrottle:
    """A token bucket per client address for `POST /operator/login`."""

    def __init__(self, burst: int = LOGIN_BURST, refill_seconds: float = LOGIN_REFILL_SECONDS) -> None:
        self.burst = burst
        self.refill_seconds = refill_seconds
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, address: str, now: float | None = None) -> float:
        """Take a try for `address`: 0 when allowed, else the seconds until the next one."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(address, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) / self.refill_seconds)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) * self.refill_seconds
        self._buckets[address] = (tokens, now)
        while len(self._buckets) > LOGIN_ADDRESSES:
            self._buckets.popitem(last=False)
        return wait


def _login(token: str | None, secure: bool, throttle: LoginThrottle) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        """Check the posted token (constant time); set the session cookie."""
        wait = throttle.take(request.remote or "unknown")
        if wait > 0:
            raise Problem(429, "rate-limited", "Too many sign-in attempts from your address; wait.",
                          headers={"Retry-After": str(math.ceil(wait))})
        if token is None:
            raise Problem(403, "admin-disabled", "No operator token is configured.")
        if request.content_type != "application/x-www-form-urlencoded":
            raise Problem(415, "unsupported-media-type", "Post the form: token=<operator token>.")
        form = await request.post()
        given = form.get("token")
        if not isinstance(given, str) or not given or len(given) > MAX_TOKEN_LENGTH:
            raise Problem(400, "invalid-request", "Send the operator token in the 'token' field.")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
            raise Problem(403, "forbidden", "That operator token is not valid.")
        response = web.Response(status=204, headers={"Cache-Control": "no-store"})
        response.set_cookie(operator_session.COOKIE_NAME, operator_session.issue(token),
                            max_age=operator_session.SESSION_SECONDS, path=operator_session.COOKIE_PATH,
                            httponly=True, samesite="Strict", secure=secure)
        return response
    return handler


async def _logout(request: web.Request) -> web.Response:
    """Revoke this browser's session for the cluster (the cookie reaches `/admin` paths
    only, so the console posts here), and clear the cookie."""
    sessions = request.app.get(CONSOLE_SESSIONS)
    cookie = request.cookies.get(operator_session.COOKIE_NAME)
    if sessions is not None and cookie is not None:
        try:
            await sessions.revoke(cookie)
        except (MapError, TimeoutError) as exc:
            raise Problem(503, "logout-not-recorded",
                          "Signing out could not be recorded for the cluster; retry.",
                          headers={"Retry-After": "2"}) from exc
    return _cleared()


async def _clear_cookie(_: web.Request) -> web.Response:
    return _cleared()


def _cleared() -> web.Response:
    response = web.Response(status=204, headers={"Cache-Control": "no-store"})
    response.del_cookie(operator_session.COOKIE_NAME, path=operator_session.COOKIE_PATH)
    return response


async def _to_console(_: web.Request) -> web.Response:
    raise web.HTTPFound("/admin/")


def add_console_routes(app: web.Application, store: MapStore, watcher: MapWatcher,
                       health: HealthWatcher | None, region: str, token: str | None,
                       secure_cookie: bool = False) -> None:
    """Register the console on a gateway app (called from gateway.app.create_app)."""
    app[CONSOLE] = ConsoleState(region, store, watcher, health, token or "")
    if token:
        app[CONSOLE_SESSIONS] = operator_session.ConsoleSessions(token, ConsulRevocations(store))

    async def close(app: web.Application) -> None:
        await app[CONSOLE].close()

    app.on_cleanup.append(close)
    r = app.router
    r.add_get("/admin", _to_console)
    r.add_get("/admin/", _file("console.html"))
    r.add_get("/admin/console.js", _file("console.js"))
    r.add_get("/admin/console.css", _file("console.css"))
    r.add_get("/admin/api/state", _state)
    r.add_get("/operator/login", _file("console-login.html"))
    r.add_get("/operator/login.js", _file("console-login.js"))
    r.add_get("/operator/console.css", _file("console.css"))
    r.add_post("/operator/login", _login(token, secure_cookie, LoginThrottle()))
    r.add_post("/operator/logout", _clear_cookie)
    r.add_post("/admin/logout", _logout)

