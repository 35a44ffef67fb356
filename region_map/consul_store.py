"""`MapStore` on Consul KV, through py-consul's `consul.aio`. Thin on purpose.

KV layout (see docs/region-map.md), values JSON:
    <prefix>regions/<name>        Region
    <prefix>shards/<name>         Shard (epoch, primary region, members)
    <prefix>placement/<event id>  Placement {"eventId", "shard"}
Only the HTTP API of Consul 1.8+ is used: KV with `cas`, blocking queries
(`index` + `wait`), agent service registration with HTTP checks, health.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio

from region_map.model import (
    CasConflict,
    MapError,
    NotFound,
    Placement,
    Region,
    RegionMap,
    Shard,
    placement_key,
    region_key,
    shard_key,
)
from region_map.store import MapStore, ServiceInstance

log = logging.getLogger("boxoffice.region_map")

T = TypeVar("T")

CALL_TIMEOUT = 5.0  # seconds, every call on top of its blocking wait
MAX_WAIT = 300.0  # Consul caps a blocking wait at 10 min; aiohttp's default total timeout is 5
CHECK_INTERVAL = "1s"
DEREGISTER_AFTER = "30m"  # a critical instance stays listed (as critical) this long

_RECORDS: dict[str, Any] = {"regions": Region, "shards": Shard}


class ConsulMapStore(MapStore):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        prefix: str = "boxoffice/",
        token: str | None = None,
        *,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self._client: consul.aio.Consul | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> consul.aio.Consul:
        # Created lazily: consul.aio opens an aiohttp session in its constructor, which
        # needs (and is tied to) the running event loop.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = consul.aio.Consul(host=self.host, port=self.port, token=self.token)
            if self.token is not None:
                # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; ours wins.
                self._client.token = self.token
            self._loop = loop
        return self._client

    async def _call(self, call: Awaitable[T], timeout: float | None = None) -> T:
        try:
            return await asyncio.wait_for(call, timeout or self.timeout)
        except (TimeoutError, aiohttp.ClientError, OSError, consul.ConsulException) as exc:
            raise MapError(f"consul at {self.host}:{self.port}: {exc!r}") from exc

    # -- reading -----------------------------------------------------------------------
    def _snapshot(self, index: str | int, items: list[dict[str, Any]] | None) -> RegionMap:
        regions: dict[str, Region] = {}
        shards: dict[str, Shard] = {}
        placements: dict[str, str] = {}
        key_indexes: dict[str, int] = {}
        for item in items or []:
            rel = item["Key"][len(self.prefix):]
            kind, _, name = rel.partition("/")
            if kind not in ("regions", "shards", "placement") or not name or "/" in name:
                continue
            key_indexes[rel] = int(item["ModifyIndex"])
            try:
                doc = json.loads(item.get("Value") or b"null")
                if kind == "placement":
                    placements[name] = str(doc["shard"])  # the key names the event
                else:
                    record = _RECORDS[kind].from_json(doc)
                    if record.name != name:
                        raise ValueError(f"record named {record.name!r}")
                    (regions if kind == "regions" else shards)[name] = record
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # One bad record must not hide the whole map; it stays writable by CAS.
                log.warning("skipping malformed region map record %s: %s", item["Key"], exc)
        return RegionMap(regions, shards, placements, int(index), key_indexes)

    async def load(self) -> RegionMap:
        index, items = await self._call(self.client.kv.get(self.prefix, recurse=True))
        return self._snapshot(index, items)

    async def watch(self, index: int, wait_seconds: float = 30.0) -> RegionMap:
        wait = min(max(wait_seconds, 0.05), MAX_WAIT)
        budget = wait + wait / 16 + self.timeout  # Consul adds up to wait/16 of jitter
        index_out, items = await self._call(
            self.client.kv.get(self.prefix, recurse=True, index=index or None,
                               wait=f"{round(wait * 1000)}ms", connections_timeout=budget),
            timeout=budget,
        )
        return self._snapshot(index_out, items)

    async def _read(self, rel: str) -> tuple[Any, int]:
        _, item = await self._call(self.client.kv.get(self.prefix + rel))
        if item is None or item.get("Value") is None:
            raise NotFound(f"no {rel} in the region map")
        try:
            return json.loads(item["Value"]), int(item["ModifyIndex"])
        except ValueError as exc:
            raise MapError(f"malformed value at {self.prefix + rel}: {exc}") from exc

    async def read_shard(self, name: str) -> tuple[Shard, int]:
        doc, index = await self._read(shard_key(name))
        try:
            return Shard.from_json(doc), index
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MapError(f"malformed shard record {name}: {exc}") from exc

    async def read_placement(self, event_id: str) -> tuple[str, int]:
        doc, index = await self._read(placement_key(event_id))
        try:
            return str(doc["shard"]), index
        except (KeyError, TypeError) as exc:
            raise MapError(f"malformed placement of {event_id}: {exc}") from exc

    # -- writes: always check-and-set ----------------------------------------------------
    async def _cas_put(self, rel: str, value: dict[str, Any], expected_index: int) -> None:
        if expected_index < 0:
            raise ValueError(f"expected index must be >= 0, not {expected_index}")
        key = self.prefix + rel
        body = json.dumps(value, sort_keys=True)
        # Consul treats a write of an identical entry (value, flags, session) as a no-op
        # that succeeds WITHOUT bumping ModifyIndex, so rewriting an unchanged record
        # would "win" and let a rival's change from the same read win as well. Flags
        # carry the index the write was based on, which always differs from the
        # stored entry's (its own base index is older), so every CAS write is a change.
        written = await self._call(self.client.kv.put(
            key, body, cas=int(expected_index), flags=int(expected_index)))
        if not written:  # Consul answers a lost check-and-set with 200 and `false`
            raise CasConflict(key, expected_index)

    async def put_region(self, region: Region, expected_index: int) -> None:
        await self._cas_put(region_key(region.name), region.to_json(), expected_index)

    async def put_shard(self, shard: Shard, expected_index: int) -> None:
        await self._cas_put(shard_key(shard.name), shard.to_json(), expected_index)

    async def place_event(self, event_id: str, shard: str, expected_index: int) -> None:
        value = Placement(event_id, shard).to_json()
        await self._cas_put(placement_key(event_id), value, expected_index)

    async def unplace_event(self, event_id: str, expected_index: int) -> None:
        if expected_index <= 0:
            raise ValueError("removing a placement needs its current modify index")
        key = self.prefix + placement_key(event_id)
        # A check-and-set DELETE answers `true` only if the key's ModifyIndex matched.
        if not await self._call(self.client.kv.delete(key, cas=int(expected_index))):
            raise CasConflict(key, expected_index)

    async def delete_all(self) -> None:
        await self._call(self.client.kv.delete(self.prefix, recurse=True))

    # -- service registry --------------------------------------------------------
    async def register_service(
        self, service: str, instance_id: str, address: str, port: int, tags: list[str],
        health_url: str, url: str = "",
    ) -> None:
        check = consul.Check.http(health_url, CHECK_INTERVAL, timeout=CHECK_INTERVAL,
                                  deregister=DEREGISTER_AFTER)
        ok = await self._call(self.client.agent.service.register(
            service, service_id=instance_id, address=address, port=port, tags=list(tags),
            check=check, meta={"url": url} if url else None,
        ))
        if not ok:
            raise MapError(f"consul refused to register {instance_id}")

    async def deregister_service(self, instance_id: str) -> None:
        # Idempotent: Consul 1.8 answers 200 for an unknown id, later versions 404 (-> False).
        await self._call(self.client.agent.service.deregister(instance_id))

    async def watch_healthy_instances(
        self, service: str, index: int, wait_seconds: float = 30.0
    ) -> tuple[int, list[ServiceInstance]]:
        wait = min(max(wait_seconds, 0.05), MAX_WAIT)
        index_out, entries = await self._call(
            self.client.health.service(service, passing=True, index=index or None,
                                       wait=f"{round(wait * 1000)}ms"),
            timeout=wait + wait / 16 + self.timeout,
        )
        return int(index_out), [
            ServiceInstance(
                service, e["Service"]["ID"],
                e["Service"]["Address"] or e["Node"]["Address"],  # "" means the node's address
                int(e["Service"]["Port"]), tuple(e["Service"].get("Tags") or ()),
                url=(e["Service"].get("Meta") or {}).get("url", ""),
            )
            for e in entries or []
        ]

    async def watch_instances(
        self, service: str, index: int, wait_seconds: float = 30.0
    ) -> tuple[int, list[ServiceInstance]]:
        wait = min(max(wait_seconds, 0.05), MAX_WAIT)
        index_out, entries = await self._call(
            self.client.health.service(service, index=index or None,
                                       wait=f"{round(wait * 1000)}ms"),
            timeout=wait + wait / 16 + self.timeout,
        )
        return int(index_out), [
            ServiceInstance(
                service, e["Service"]["ID"],
                e["Service"]["Address"] or e["Node"]["Address"],
                int(e["Service"]["Port"]), tuple(e["Service"].get("Tags") or ()),
                # the instance's own checks and its node's (serfHealth) all passing
                passing=all(c.get("Status") == "passing" for c in e.get("Checks") or ()),
                url=(e["Service"].get("Meta") or {}).get("url", ""),
            )
            for e in entries or []
        ]

    async def close(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.close()
