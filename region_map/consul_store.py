"""`MapStore` on Consul KV, through py-consul's `consul.aio`. Thin on purpose.

KV layout (see docs/region-map.md), values JSON:
    <prefix>regions/<name>        Region
    <prefix>shards/<name>         Shard (epoch, primary region, members)
    <prefix>placement/<event id>  {"shard": "<name>"}
Only the Consul HTTP API of 1.8+ is used: KV with `cas`, blocking queries
(`index` + `wait`), agent service registration with HTTP checks, health.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import consul
import consul.aio

from region_map.model import CasConflict, MapError, NotFound, Region, RegionMap, Shard
from region_map.store import MapStore, ServiceInstance

CALL_TIMEOUT = 5.0  # seconds, for every non-blocking call


class ConsulMapStore(MapStore):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        prefix: str = "boxoffice/",
        token: str | None = None,
    ) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.host, self.port, self.token = host, port, token
        self._client: consul.aio.Consul | None = None

    @property
    def client(self) -> consul.aio.Consul:
        # Created lazily: consul.aio needs a running event loop.
        if self._client is None:
            self._client = consul.aio.Consul(host=self.host, port=self.port, token=self.token)
        return self._client

    async def _call(self, coro: Any, timeout: float = CALL_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        except (TimeoutError, aiohttp.ClientError, OSError, consul.ConsulException) as exc:
            raise MapError(f"consul at {self.host}:{self.port}: {exc!r}") from exc

    # -- reading -----------------------------------------------------------------
    def _snapshot(self, index: int, items: list[dict[str, Any]] | None) -> RegionMap:
        regions: dict[str, Region] = {}
        shards: dict[str, Shard] = {}
        placements: dict[str, str] = {}
        key_indexes: dict[str, int] = {}
        for item in items or []:
            key, raw = item["Key"], item.get("Value")
            if raw is None:
                continue
            rel = key[len(self.prefix):]
            kind, _, name = rel.partition("/")
            try:
                doc = json.loads(raw)
                if kind == "regions":
                    regions[name] = Region.from_json(doc)
                elif kind == "shards":
                    shards[name] = Shard.from_json(doc)
                elif kind == "placement":
                    placements[name] = str(doc["shard"])
                else:
                    continue
            except (ValueError, KeyError, TypeError) as exc:
                raise MapError(f"malformed value at {key}: {exc}") from exc
            key_indexes[key] = int(item["ModifyIndex"])
        return RegionMap(regions, shards, placements, int(index), key_indexes)

    async def load(self) -> RegionMap:
        index, items = await self._call(self.client.kv.get(self.prefix, recurse=True))
        return self._snapshot(index, items)

    async def watch(self, index: int, wait_seconds: float = 30.0) -> RegionMap:
        wait = max(1, int(wait_seconds))
        index_out, items = await self._call(
            self.client.kv.get(self.prefix, recurse=True, index=index or None, wait=f"{wait}s"),
            timeout=wait + wait / 16 + CALL_TIMEOUT,  # Consul adds up to wait/16 of jitter
        )
        return self._snapshot(index_out, items)

    async def read_shard(self, name: str) -> tuple[Shard, int]:
        _, item = await self._call(self.client.kv.get(self.shard_key(name)))
        if item is None or item.get("Value") is None:
            raise NotFound(f"no shard {name}")
        return Shard.from_json(json.loads(item["Value"])), int(item["ModifyIndex"])

    # -- writes: always check-and-set ----------------------------------------------
    async def _cas_put(self, key: str, value: dict[str, Any], expected_index: int) -> None:
        ok = await self._call(
            self.client.kv.put(key, json.dumps(value, sort_keys=True), cas=int(expected_index))
        )
        if not ok:
            raise CasConflict(key, expected_index)

    async def put_region(self, region: Region, expected_index: int) -> None:
        await self._cas_put(self.region_key(region.name), region.to_json(), expected_index)

    async def put_shard(self, shard: Shard, expected_index: int) -> None:
        await self._cas_put(self.shard_key(shard.name), shard.to_json(), expected_index)

    async def place_event(self, event_id: str, shard: str, expected_index: int) -> None:
        await self._cas_put(self.placement_key(event_id), {"shard": shard}, expected_index)

    async def delete_all(self) -> None:
        await self._call(self.client.kv.delete(self.prefix, recurse=True))

    # -- service registry ------------------------------------------------------
    async def register_service(
        self, service: str, instance_id: str, address: str, port: int, tags: list[str],
        health_url: str,
    ) -> None:
        check = consul.Check.http(health_url, "1s", timeout="1s", deregister="10m")
        await self._call(self.client.agent.service.register(
            service, service_id=instance_id, address=address, port=port, tags=tags, check=check,
        ))

    async def deregister_service(self, instance_id: str) -> None:
        await self._call(self.client.agent.service.deregister(instance_id))

    async def healthy_instances(self, service: str) -> list[ServiceInstance]:
        _, nodes = await self._call(self.client.health.service(service, passing=True))
        return [
            ServiceInstance(service, n["Service"]["ID"], n["Service"]["Address"],
                            int(n["Service"]["Port"]), tuple(n["Service"].get("Tags") or ()))
            for n in nodes or []
        ]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
