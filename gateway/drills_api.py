"""`POST /admin/drills/failover`: a failover drill run by a gateway (operator token).

    POST /admin/drills/failover  {"shard": "shard-1", "kind": "kill-primary"}
    -> 200 the drill's report (failover/drill_report.py), "ok": false when a booking
       was lost, oversold or duplicated, "passed": false also when the fault did not
       lead where the platform's rules say ("expected" and "outcome": a failover, or
       none when no copy may be promoted by itself); 409 when refused or unfinished (a
       drill already running here, the cluster not at full strength, an unknown kind,
       no controller holding the lock, recovery that will not come: the detail says
       which); 400 for a bad body.

The gateway has no database connection and sends no signals, so its drill acts only
through the platform's own operator interfaces: the fault is a node agent's drill
primitive (`POST /agent/drill/crash`: the host's Postgres servers and booking service
die, as by power loss, and stay down until `/agent/drill/recover`; the agent itself
stays up, so no process supervisor restarts anything behind the drill's back and no
hold-down marker is needed, failover/holddown.py), the audit is each
shard primary's booking service (`GET .../admin/events/{id}/audit`), and the booking
load goes through every region's gateway over HTTP, like any client's. The drill runs
in a thread with its own event loop, so its load and its waits never run on this
gateway's request loop. One drill at a time per gateway. A manual drill (the
controllers paused) needs process signals: `boxoffice drill failover --manual`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from common.api import read_json_object
from common.internal_auth import Signer
from common.problems import Problem
from failover.drill import KINDS, DrillCluster, DrillError, DrillSettings, ShardAudit, run_drill
from region_map import NODE_AGENT_SERVICE, ConsulMapStore, MapError, MapStore, RegionMap

log = logging.getLogger("boxoffice.gateway.drills")

AGENT_TIMEOUT = 10.0


class AgentFaults:
    """Faults through the node agents' drill primitives (HTTP, operator token)."""

    def __init__(self, agent_urls: dict[str, str], token: str) -> None:
        self.agent_urls = agent_urls  # host key -> the agent's base URL
        self.token = token
        self.crashed: list[str] = []

    def _post(self, host: str, path: str) -> Any:
        url = self.agent_urls.get(host)
        if url is None:
            raise DrillError(f"no node agent is registered for host {host}")
        # Signed as the operator (common/internal_auth.py): the token never goes to an
        # address read from the registry.
        signature = Signer.operator(self.token).sign("POST", f"{url}{path}", b"{}")
        req = urllib.request.Request(f"{url}{path}", data=b"{}", method="POST", headers={
            **signature, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=AGENT_TIMEOUT) as resp:
                return json.loads(resp.read() or b"null")
        except OSError as exc:
            raise DrillError(f"the node agent of {host} did not answer ({type(exc).__name__})") from None

    def kill_host(self, host: str) -> None:
        self._post(host, "/agent/drill/crash")
        self.crashed.append(host)

    def restart(self) -> list[str]:
        restarted = []
        for host in self.crashed:
            self._post(host, "/agent/drill/recover")
            restarted.append(f"host {host}")
        self.crashed.clear()
        return restarted

    def pause_controllers(self, paused: bool) -> list[str]:
        raise DrillError("a manual drill pauses the controllers by signal: run it with the CLI "
                         "(boxoffice drill failover --manual)")


class ServiceAuditor:
    """The audit through each copy's booking service (it alone holds booking SQL)."""

    def __init__(self, current_map: Callable[[], RegionMap | None], token: str,
                 physical_url: Callable[[str], str]) -> None:
        self.current_map = current_map
        self.token = token
        self.physical_url = physical_url

    async def audit(self, shard: str, copy: str, event_id: str, prefix: str) -> ShardAudit:
        region_map = self.current_map()
        if region_map is None or shard not in region_map.shards:
            raise DrillError(f"shard {shard} is not in the map")
        member = region_map.shards[shard].members[copy]
        query = urllib.parse.urlencode({"referencePrefix": prefix})
        url = self.physical_url(f"{member.service_url}/admin/events/{event_id}/audit?{query}")
        target = URL(url, encoded=True)  # signed as the operator, as sent (internal_auth)
        async with aiohttp.ClientSession() as session, session.get(
                target, headers=Signer.operator(self.token).sign("GET", target),
                timeout=aiohttp.ClientTimeout(total=AGENT_TIMEOUT)) as resp:
            doc = await resp.json(content_type=None)
            if resp.status != 200:
                raise DrillError(f"the audit of {shard} on {copy} answered {resp.status}")
        return ShardAudit(dict(doc["bookings"]), list(doc["oversold"]), list(doc["duplicated"]))


class DrillsApi:
    def __init__(self, store: MapStore, token: str | None, current_map: Callable[[], RegionMap | None],
                 physical_url: Callable[[str], str]) -> None:
        self.store = store
        self.token = token
        self.current_map = current_map
        self.physical_url = physical_url
        self.running = threading.Lock()

    async def drill_failover(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        shard, kind = body.get("shard"), body.get("kind", "kill-primary")
        region_map = self.current_map()
        if region_map is None:
            raise Problem(503, "map-unavailable", "The region map has not been loaded yet.",
                          headers={"Retry-After": "1"})
        if not isinstance(shard, str) or shard not in region_map.shards:
            raise Problem(400, "invalid-request", "shard must name a shard of the map.",
                          errors=[{"field": "shard", "detail": "unknown shard"}])
        if kind not in KINDS:
            raise Problem(400, "invalid-request", f"kind must be one of {', '.join(KINDS)}.",
                          errors=[{"field": "kind", "detail": "unknown kind"}])
        if not isinstance(self.store, ConsulMapStore) or self.token is None:
            raise Problem(409, "drill-unavailable", "Drills need the Consul store and an operator token.")
        if not self.running.acquire(blocking=False):
            raise Problem(409, "drill-running", "A drill is already running on this gateway.",
                          headers={"Retry-After": "30"})
        try:
            cluster = await self._cluster(region_map, self.store, self.token)
            settings = DrillSettings(shard=shard, kind=kind)
            # Its own thread and event loop: the drill's load never runs on this loop.
            report = await asyncio.to_thread(asyncio.run, run_drill(cluster, settings))
        except DrillError as exc:
            raise Problem(409, "drill-refused", str(exc)) from None
        except MapError:
            raise Problem(503, "map-unavailable", "The region map store did not answer.",
                          headers={"Retry-After": "1"}) from None
        finally:
            self.running.release()
        log.warning("failover drill finished", extra={"shard": shard, "kind": kind, "ok": report.get("ok")})
        return web.json_response(report)

    async def _cluster(self, region_map: RegionMap, store: ConsulMapStore, token: str) -> DrillCluster:
        _, instances = await store.watch_instances(NODE_AGENT_SERVICE, 0)
        agents = {}
        for instance in instances:
            host = next((t.split("=", 1)[1] for t in instance.tags if t.startswith("host=")), None)
            if host and instance.url:
                agents[host] = instance.url
        return DrillCluster(
            gateways={r.name: r.gateway_url for r in region_map.regions.values()},
            admin_token=token, consul_host=store.host, consul_port=store.port,
            map_prefix=store.prefix, controllers={},
            faults=AgentFaults(agents, token),
            auditor=ServiceAuditor(self.current_map, token, self.physical_url),
        )


def add_drill_routes(app: web.Application, store: MapStore, token: str | None,
                     current_map: Callable[[], RegionMap | None],
                     physical_url: Callable[[str], str]) -> None:
    api = DrillsApi(store, token, current_map, physical_url)
    app.router.add_post("/admin/drills/failover", api.drill_failover)
