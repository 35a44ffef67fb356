"""Consul's ACLs on a real cluster: nobody without a token reads or writes anything, and
each component's token (deploy/consul_acl.py) does only what that component does.

The attack of issue 21 item 3: with Consul open, anyone who reached its HTTP port could
register a `node-agent` instance whose meta URL pointed at them (the console then sent
the operator token there) and rewrite the region map. Here every such call is refused
(403), with no token or with a token of another kind of process, while the cluster still
books and its failover controllers still hold exactly one lock.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from deploy.consul_agent import ConsulAgent
from failover.leadership import CONTROLLER_LOCK
from region_map import CONSUL_TOKEN_ENV, NODE_AGENT_SERVICE, ConsulMapStore, MapError
from tests.conftest import SMALL_TOPOLOGY, own_cluster
from tests.support import create_event, poll

if TYPE_CHECKING:
    from deploy.cluster import Cluster

TOPOLOGY = {**SMALL_TOPOLOGY, "name": "test-acl",
            "controller": {"enabled": True, "grace_ms": 400, "lock_ttl_seconds": 1}}


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "acl-cluster", TOPOLOGY) as c:
        yield c


def consul_url(cluster: Cluster) -> str:
    assert cluster.consul is not None
    return cluster.consul.url


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, str]:
    """One raw call to Consul's HTTP API; (status, body)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"X-Consul-Token": token} if token else {}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def forged_agent(instance: str) -> dict[str, Any]:
    """A node-agent registration whose URL points at an attacker (the console would send
    the operator token there)."""
    return {"Name": NODE_AGENT_SERVICE, "ID": instance, "Address": "127.0.0.1", "Port": 9,
            "Tags": ["region=east", "zone=a", "host=east"],
            "Meta": {"url": "http://127.0.0.1:9"}}


def registered(cluster: Cluster, instance: str) -> bool:
    status, body = http("GET", f"{consul_url(cluster)}/v1/agent/services", token=cluster.consul_token)
    assert status == 200, body
    return instance in json.loads(body)


def store(cluster: Cluster, kind: str) -> ConsulMapStore:
    assert cluster.consul is not None
    return ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix,
                          token=cluster.consul_tokens[kind])


def consul_token_of(pid: int | None) -> str | None:
    """The Consul token a process runs with (its environment; the tests run as root)."""
    assert pid is not None
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = dict(e.decode().partition("=")[::2] for e in environ if b"=" in e)
    return found.get(CONSUL_TOKEN_ENV)


def test_each_process_runs_with_its_own_kinds_token(cluster: Cluster) -> None:
    """Not the management token (which this test process has in its environment, so a
    process that inherited it instead of getting its own would still work)."""
    tokens = cluster.consul_tokens
    assert len(set(tokens.values())) == len(tokens) and cluster.consul_token not in tokens.values()
    for proc in cluster.gateways.values():
        assert consul_token_of(proc.pid) == tokens["gateway"]
    for proc in cluster.controllers.values():
        assert consul_token_of(proc.pid) == tokens["controller"]
    for host, proc in cluster.agents.items():
        assert consul_token_of(proc.pid) == tokens["agent"]
        assert consul_token_of(cluster.service_pid(host)) == tokens["service"]


async def test_without_a_token_consul_refuses_every_read_and_write(cluster: Cluster) -> None:
    base = consul_url(cluster)
    assert http("GET", f"{base}/v1/kv/{cluster.map_prefix}?recurse")[0] == 403
    assert http("GET", f"{base}/v1/kv/{cluster.map_prefix}shards/shard-a")[0] == 403
    assert http("PUT", f"{base}/v1/kv/{cluster.map_prefix}shards/shard-a", {"forged": True})[0] == 403
    assert http("PUT", f"{base}/v1/session/create", {"TTL": "10s"})[0] == 403
    instance = f"{NODE_AGENT_SERVICE}-forged-{uuid.uuid4().hex[:6]}"
    status, body = http("PUT", f"{base}/v1/agent/service/register", forged_agent(instance))
    assert status == 403, body
    assert not registered(cluster, instance)
    # The map is still there, for a token that may read it.
    async with store(cluster, "gateway") as reader:
        assert set((await reader.load()).shards) == {"shard-a", "shard-b"}


def test_the_test_sessions_own_consul_agent_runs_with_acls_too(consul_agent: ConsulAgent) -> None:
    url = f"{consul_agent.url}/v1/kv/acl-probe"
    assert http("PUT", url, "x")[0] == 403
    assert http("PUT", url, "x", consul_agent.management_token) == (200, "true")


@pytest.mark.parametrize("kind", ["gateway", "agent", "service", "controller", "prometheus"])
async def test_a_forged_node_agent_registration_is_refused_with_any_component_token(
        cluster: Cluster, kind: str) -> None:
    """No process of the cluster registers services (the launcher does, with the management
    token), so no component's token may: not even a node agent's own."""
    instance = f"{NODE_AGENT_SERVICE}-forged-{kind}-{uuid.uuid4().hex[:6]}"
    status, body = http("PUT", f"{consul_url(cluster)}/v1/agent/service/register",
                        forged_agent(instance), token=cluster.consul_tokens[kind])
    assert status == 403, body
    assert not registered(cluster, instance)
    async with store(cluster, kind) as s:
        with pytest.raises(MapError):
            await s.register_service(NODE_AGENT_SERVICE, instance, "127.0.0.1", 9, [], None,
                                     url="http://127.0.0.1:9")
    assert not registered(cluster, instance)


async def test_the_gateway_token_cannot_move_regions_or_take_the_controller_lock(cluster: Cluster) -> None:
    async with store(cluster, "gateway") as gateway:
        current = await gateway.load()
        region = current.regions["east"]
        with pytest.raises(MapError):  # where clients and writes of a region go
            await gateway.put_region(region, current.region_index("east"))
        session = await gateway.create_session("acl-test-gateway", 10)  # its leases need one
        try:
            with pytest.raises(MapError):
                await gateway.acquire_lock(CONTROLLER_LOCK, session, {"holder": "forged"})
            with pytest.raises(MapError):
                await gateway.acquire_lock(f"acl-test-{uuid.uuid4().hex[:6]}", session, {})
        finally:
            await gateway.destroy_session(session)
    async with store(cluster, "controller") as controller:
        assert (await controller.load()).regions["east"] == region  # unchanged


async def test_agent_and_service_tokens_only_read_the_map(cluster: Cluster) -> None:
    for kind in ("agent", "service"):
        async with store(cluster, kind) as s:
            current = await s.load()
            assert set(current.shards) == {"shard-a", "shard-b"}
            shard, index = await s.read_shard("shard-a")
            with pytest.raises(MapError):
                await s.put_shard(shard, index)  # even an unchanged record
            with pytest.raises(MapError):
                await s.place_event(str(uuid.uuid4()), "shard-a", 0)
            with pytest.raises(MapError):
                await s.create_session(f"acl-test-{kind}", 10)


async def test_the_controller_token_writes_the_map_and_holds_locks(cluster: Cluster) -> None:
    event_id = str(uuid.uuid4())
    async with store(cluster, "controller") as controller:
        await controller.place_event(event_id, "shard-a", 0)
        _, index = await controller.read_placement(event_id)
        await controller.unplace_event(event_id, index)
        shard, index = await controller.read_shard("shard-a")
        await controller.put_shard(shard, index)  # the same record: a real write (flags)
        session = await controller.create_session("acl-test-controller", 10)
        try:
            assert await controller.acquire_lock(f"acl-test-{uuid.uuid4().hex[:6]}", session, {})
        finally:
            await controller.destroy_session(session)


async def test_with_acls_the_cluster_books_and_one_controller_holds_the_lock(cluster: Cluster) -> None:
    assert cluster.plan is not None
    gateway = cluster.plan.gateway_url("east")
    async with aiohttp.ClientSession() as s:
        event = await create_event(s, gateway, [5])
        item = {"ticketTierId": event.tier_ids[0], "quantity": 1}
        for region in ("east", "west"):
            async with s.post(f"{cluster.plan.gateway_url(region)}/api/bookings",
                              json={"eventId": event.id, "items": [item]}) as resp:
                assert resp.status == 201, await resp.text()

    async def one_active() -> bool:
        docs = [await asyncio.to_thread(cluster.controller_status, r) for r in cluster.controllers]
        return all(docs) and sum(bool(d.get("active")) for d in docs) == 1

    await poll(one_active, "exactly one active controller")
    async with store(cluster, "controller") as controller:
        assert (await controller.lock_holder(CONTROLLER_LOCK)).session is not None
