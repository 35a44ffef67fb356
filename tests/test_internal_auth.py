"""Internal APIs refuse callers without a valid signature, and the operator token never
goes to an address read from Consul (issue 21, items 3 and 6; common/internal_auth.py).

Against the session cluster: booking services' booking and read routes, node agents'
`/agent/*`; in process, the failover controller's status listener (the session cluster
runs no controller). A service registered in Consul as a `node-agent` pointing at a
test server receives signed calls without any bearer when the console refreshes and
when the controller's agent client or the operator's `ShardAdmin` calls it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from common.internal_auth import SIGNATURE_HEADER, Signer
from deploy.procs import free_port
from event_ops.shard_admin import ShardAdmin
from failover.agents import NodeAgents
from region_map import NODE_AGENT_SERVICE, ConsulMapStore, ShardMember
from tests.conftest import ADMIN_TOKEN
from tests.support import create_event, gateway_url, poll, signed

if TYPE_CHECKING:
    from deploy.cluster import Cluster

PROBLEM = "application/problem+json"


async def send(s: aiohttp.ClientSession, method: str, url: str, body: bytes = b"",
               headers: dict[str, str] | None = None,
               content_type: str = "application/json") -> tuple[int, str, str]:
    """One request exactly as given; (status, content type, text)."""
    all_headers = {**({"Content-Type": content_type} if body else {}), **(headers or {})}
    async with s.request(method, url, data=body or None, headers=all_headers) as resp:
        return resp.status, resp.content_type, await resp.text()


def targets(cluster: Cluster) -> list[tuple[str, str, bytes]]:
    """Internal routes, none of whose calls below changes anything when it is served."""
    assert cluster.plan is not None
    service = f"{cluster.plan.service_url('east')}/shards/shard-a"
    agent = cluster.plan.agent_url("east")
    booking = json.dumps({"eventId": str(uuid.uuid4()), "clientReference": f"x-{uuid.uuid4()}",
                          "items": [{"ticketTierId": str(uuid.uuid4()), "quantity": 1}]}).encode()
    return [
        ("POST", f"{service}/api/bookings", booking),
        ("GET", f"{service}/api/events", b""),
        ("GET", f"{agent}/agent/copies", b""),
        ("POST", f"{agent}/agent/copies/no-such-shard/promote", b'{"epoch": 1}'),
    ]


async def test_unsigned_calls_to_internal_routes_are_refused(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        for method, url, body in targets(cluster):
            status, ctype, text = await send(s, method, url, body)
            assert (status, ctype) == (401, PROBLEM), (method, url, status, text)


async def test_a_browser_style_post_is_refused(cluster: Cluster) -> None:
    """A page's `fetch` with a CORS-simple body (text/plain, a form) sends no signature."""
    async with aiohttp.ClientSession() as s:
        for method, url, body in targets(cluster):
            if method != "POST":
                continue
            for ctype in ("text/plain", "application/x-www-form-urlencoded"):
                status, got, text = await send(s, method, url, body, content_type=ctype,
                                               headers={"Origin": "https://evil.example"})
                assert (status, got) == (401, PROBLEM), (url, ctype, status, text)


async def test_forged_signatures_are_refused(cluster: Cluster) -> None:
    stranger = Signer("operator", secrets.token_bytes(32), "stranger")
    async with aiohttp.ClientSession() as s:
        for method, url, body in targets(cluster):
            forgeries = {
                "wrong key": stranger.sign(method, url, body),
                "stale": Signer.operator(ADMIN_TOKEN).sign(method, url, body, now=time.time() - 300),
                "future": Signer.operator(ADMIN_TOKEN).sign(method, url, body, now=time.time() + 300),
                "other path": signed(method, url + "?x=1", body),
                "other method": signed("PUT", url, body),
                "over-long": {SIGNATURE_HEADER: "v1;operator;" + "a" * 400},
                "garbage": {SIGNATURE_HEADER: "v1;operator;x;1;2;3"},
                "unknown kind": signed(method, url, body, kind="agent", cluster=cluster),
            }
            if body:
                forgeries["tampered body"] = signed(method, url, body.replace(b"1", b"2"))
            for what, headers in forgeries.items():
                status, ctype, text = await send(s, method, url, body, headers)
                assert (status, ctype) == (401, PROBLEM), (what, method, url, status, text)


async def test_a_non_ascii_signature_header_is_a_401(cluster: Cluster) -> None:
    assert cluster.plan is not None
    for base, path in ((cluster.plan.agent_url("east"), "/agent/copies"),
                       (cluster.plan.service_url("east"), "/shards/shard-a/api/events")):
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                     + SIGNATURE_HEADER.encode() + b": v1;operator;\xff\xfe;1;2;3\r\n\r\n")
        await writer.drain()
        head = (await reader.read(200)).decode(errors="replace")
        writer.close()
        assert head.startswith("HTTP/1.1 401"), (base, head)


async def test_a_replayed_request_is_refused(cluster: Cluster) -> None:
    assert cluster.plan is not None
    agent = f"{cluster.plan.agent_url('east')}/agent/copies"
    events = f"{cluster.plan.service_url('east')}/shards/shard-a/api/events"
    async with aiohttp.ClientSession() as s:
        for url, kind in ((agent, "operator"), (events, "gateway")):
            headers = signed("GET", url, kind=kind, cluster=cluster)
            assert (await send(s, "GET", url, headers=headers))[0] == 200, url
            status, ctype, _ = await send(s, "GET", url, headers=headers)
            assert (status, ctype) == (401, PROBLEM), url


async def test_each_route_takes_only_its_kinds_of_caller(cluster: Cluster) -> None:
    """A gateway may book but not act as the operator; a booking service's operator
    routes take the operator and controllers; node agents take no gateway."""
    assert cluster.plan is not None
    service = f"{cluster.plan.service_url('east')}/shards/shard-a"
    agent = f"{cluster.plan.agent_url('east')}/agent/copies"
    async with aiohttp.ClientSession() as s:
        url = f"{service}/admin/events/{uuid.uuid4()}/audit"
        status, ctype, _ = await send(s, "GET", url, headers=signed("GET", url, kind="gateway",
                                                                   cluster=cluster))
        assert (status, ctype) == (403, PROBLEM)
        for kind in ("operator", "controller"):
            status, _, text = await send(s, "GET", url, headers=signed("GET", url, kind=kind,
                                                                      cluster=cluster))
            assert status not in (401, 403), (kind, status, text)  # authenticated: the handler answers
        status, _, _ = await send(s, "GET", agent, headers=signed("GET", agent, kind="gateway",
                                                                  cluster=cluster))
        assert status == 401  # an agent holds no gateway key at all
        status, _, _ = await send(s, "GET", agent, headers=signed("GET", agent, kind="controller",
                                                                  cluster=cluster))
        assert status == 200


async def test_the_normal_paths_still_work(cluster: Cluster) -> None:
    """Gateways book through signed calls; the operator's signed calls and a person's
    bearer token at a known address reach the agents; health checks stay open."""
    assert cluster.plan is not None
    gateway = gateway_url(cluster, "east")
    async with aiohttp.ClientSession() as s:
        event = await create_event(s, gateway, [5])
        body = {"eventId": event.id, "clientReference": f"ok-{uuid.uuid4()}",
                "items": [{"ticketTierId": event.tier_ids[0], "quantity": 1}]}
        async with s.post(f"{gateway}/api/bookings", json=body) as resp:
            assert resp.status == 201, await resp.text()
        agent = cluster.plan.agent_url("east")
        async with s.get(f"{agent}/agent/copies",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            assert resp.status == 200
        async with s.get(f"{agent}/agent/health") as resp:
            assert resp.status == 200
        async with s.get(f"{cluster.plan.service_url('east')}/shards/shard-a/api/ready") as resp:
            assert set(await resp.json()) == {"status"}
    copies = await asyncio.to_thread(cluster.agent_call, "east", "GET", "/agent/copies")
    assert copies["copies"]


def test_agents_and_services_hold_no_operator_token(cluster: Cluster) -> None:
    """They verify the operator by its derived key: the token is in neither their
    environment nor the agents' configs (which carry the services' environment)."""
    for host in cluster.topology.hosts:
        config = (cluster.state_dir / f"node-agent-{host.slug}.json").read_text()
        assert ADMIN_TOKEN not in config, host.key
        agent_pid = cluster.agents[host.key].pid
        service_pid = cluster.service_pid(host.key)
        assert agent_pid is not None and service_pid is not None
        for pid in (agent_pid, service_pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"BOXOFFICE_INTERNAL_VERIFY=" in environ, (host.key, pid)
            assert ADMIN_TOKEN.encode() not in environ, (host.key, pid)


class Rogue:
    """An HTTP server that answers like a node agent and records what it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append({"path": request.path_qs, **request.headers})
        return web.json_response({"region": "x", "copies": [
            {"shard": "shard-a", "name": "x", "running": True, "role": "standby"}]})


@pytest.fixture
async def rogue(cluster: Cluster) -> AsyncIterator[tuple[Rogue, str, str]]:
    """A `node-agent` registered in the cluster's Consul for a host of its own, its meta
    URL the rogue server's (as anyone could without ACLs; with them, anyone holding a
    write token: registered here with the management token the harness has)."""
    assert cluster.consul is not None
    fake = Rogue()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    host = f"rogue-{uuid.uuid4().hex[:6]}"
    store = cluster.consul_store()
    instance = f"node-agent-{host}"
    await store.register_service(NODE_AGENT_SERVICE, instance, "127.0.0.1", server.port,
                                 [f"host={host}"], None, url=url)
    try:
        yield fake, host, url
    finally:
        await store.deregister_service(instance)
        await store.close()
        await server.close()


def assert_no_token(seen: list[dict[str, str]]) -> None:
    assert seen
    for headers in seen:
        assert "Authorization" not in headers, headers
        assert not any(ADMIN_TOKEN in v for v in headers.values()), headers
        assert headers[SIGNATURE_HEADER].split(";")[1] in ("operator", "controller"), headers


async def test_a_forged_agent_registration_never_receives_the_operator_token(
        cluster: Cluster, rogue: tuple[Rogue, str, str]) -> None:
    fake, host, url = rogue
    assert cluster.consul is not None
    gateway = gateway_url(cluster, "east")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as s:

        async def console_called_it() -> bool:
            async with s.get(f"{gateway}/admin/api/state") as resp:
                assert resp.status == 200
            return any(h["path"] == "/agent/copies" for h in fake.seen)

        await poll(console_called_it, "the console's refresh calls the registered agent", 15)
    # The controllers' and the CLI's client of the agents, and the operator's calls to
    # booking services (addresses from the map), the same way.
    store = cluster.consul_store()
    try:
        async with NodeAgents(store, ADMIN_TOKEN) as agents:
            status = await agents.copy_status(host, "shard-a")
            assert status.shard == "shard-a"
    finally:
        await store.close()
    async with ShardAdmin(ADMIN_TOKEN) as admin:
        answer = await admin.call("GET", ShardMember("east", url, "127.0.0.1:1"), "/api/events",
                                  params={"limit": "1"})
        assert answer.status == 200
    assert {h["path"] for h in fake.seen} >= {"/agent/copies", "/api/events?limit=1"}
    assert_no_token(fake.seen)


# -- the failover controller's status listener (in process: the session cluster has none) --

@pytest.fixture
async def controller_status(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, bytes]]:
    from common import internal_auth
    from failover.__main__ import status_app
    from failover.controller import Controller, Settings

    master = secrets.token_bytes(32)
    for name, value in internal_auth.process_env("controller", master, ADMIN_TOKEN).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(internal_auth.METRICS_TOKEN_ENV, "scrape-token")
    store = ConsulMapStore(port=free_port(), prefix="unused/")
    controller = Controller(store, ADMIN_TOKEN, Settings(region="east"))
    server = TestServer(status_app(controller, ADMIN_TOKEN), host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", master
    finally:
        await server.close()
        await store.close()


async def test_the_controller_status_needs_a_gateway_or_the_operator(
        controller_status: tuple[str, bytes]) -> None:
    from common.internal_auth import derive_key

    base, master = controller_status
    url = f"{base}/status"
    agent = Signer("agent", derive_key(master, "agent"), "an-agent")
    gateway = Signer("gateway", derive_key(master, "gateway"), "a-gateway")
    async with aiohttp.ClientSession() as s:
        for headers in ({}, agent.sign("GET", url),
                        Signer("gateway", secrets.token_bytes(32)).sign("GET", url)):
            status, ctype, _ = await send(s, "GET", url, headers=headers)
            assert (status, ctype) == (401, PROBLEM), headers
        status, ctype, _ = await send(s, "GET", url, headers={"Authorization": "Bearer nope"})
        assert (status, ctype) == (403, PROBLEM)
        for headers in (gateway.sign("GET", url), signed("GET", url),
                        {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
            status, _, text = await send(s, "GET", url, headers=headers)
            assert status == 200, text
        metrics = f"{base}/metrics"
        assert (await send(s, "GET", metrics))[0] == 401
        assert (await send(s, "GET", metrics, headers=signed("GET", metrics)))[0] == 401
        status, _, text = await send(s, "GET", metrics, headers={"Authorization": "Bearer scrape-token"})
        assert status == 200 and "boxoffice_controller_active" in text
