"""`MapStore` on Consul KV, through py-consul's `consul.aio`. Thin on purpose.

KV layout (see docs/region-map.md), values JSON:
    <prefix>regions/<name>        Region
    <prefix>shards/<name>         Shard (epoch, primary region, members, sync set)
    <prefix>placement/<event id>  Placement {"eventId", "shard", "sinceLsn"?}
    <ops prefix>journals/<op id>  an operation's journal (its own JSON document)
    <ops prefix>locks/<name>      a lock: held by a session, value {who holds it}
Only the HTTP API of Consul 1.8+ is used: KV with `cas`, `acquire`, `release`,
blocking queries (`index` + `wait`), transactions (`/v1/txn`, for a
check-and-set that answers the new index), sessions with a TTL, agent service
registration with HTTP checks, health.

ACL token: the one passed (`token=`), else `$BOXOFFICE_CONSUL_TOKEN` (`CONSUL_TOKEN_ENV`,
what the launcher gives each process: deploy/consul_acl.py), else py-consul's own
`$CONSUL_HTTP_TOKEN`. A call the token may not make is refused by Consul (403) and
raised as `MapError`, like an unreachable Consul: it never reads as an empty map
(recursive reads need the `list` right: the agent runs with `enable_key_list_policy`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Awaitable, Mapping
from typing import Any, NamedTuple, TypeVar

import aiohttp
import consul
import consul.aio
from consul.base import Response

from region_map.model import (
    CasConflict,
    MapError,
    NotFound,
    Placement,
    Region,
    RegionMap,
    SessionGone,
    Shard,
    check_name,
    journal_key,
    lock_key,
    placement_key,
    region_key,
    shard_key,
)
from region_map.store import LockState, MapStore, ServiceInstance, ops_prefix_for

log = logging.getLogger("boxoffice.region_map")

T = TypeVar("T")

CALL_TIMEOUT = 5.0  # seconds, every call on top of its blocking wait
MAX_WAIT = 300.0  # Consul caps a blocking wait at 10 min; aiohttp's default total timeout is 5
CHECK_INTERVAL = "1s"
DEREGISTER_AFTER = "30m"  # a critical instance stays listed (as critical) this long

# The environment variable a process's Consul ACL token comes in (deploy/consul_acl.py).
CONSUL_TOKEN_ENV = "BOXOFFICE_CONSUL_TOKEN"

_RECORDS: dict[str, Any] = {"regions": Region, "shards": Shard}


class Answer(NamedTuple):
    """Consul's answer to a raw PUT: its status and its body, as text."""

    code: int
    body: str


class ConsulMapStore(MapStore):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        prefix: str = "boxoffice/",
        token: str | None = None,
        *,
        timeout: float = CALL_TIMEOUT,
        ops_prefix: str | None = None,
    ) -> None:
        """`ops_prefix`: where journals and locks live; by default the map prefix's
        sibling (`ops_prefix_for`: 'boxoffice/' -> 'boxoffice-ops/')."""
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.ops_prefix = ops_prefix_for(self.prefix) if ops_prefix is None else ops_prefix
        if not self.ops_prefix.endswith("/") or self.ops_prefix.startswith(self.prefix) \
                or self.prefix.startswith(self.ops_prefix):
            raise ValueError(f"ops prefix {self.ops_prefix!r} must be a '/'-ended sibling of "
                             f"{self.prefix!r}, so map watchers never see it")
        if token is None:
            token = os.environ.get(CONSUL_TOKEN_ENV) or None
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
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the call's result
        # when the caller is cancelled just as the call completes (the cancel is lost, so
        # a lease's renewer or a term's work would go on after being stopped).
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await call
        except (TimeoutError, aiohttp.ClientError, OSError, consul.ConsulException) as exc:
            raise MapError(f"consul at {self.host}:{self.port}: {exc!r}") from exc

    async def _put(self, path: str, params: list[tuple[str, Any]] | None = None,
                   body: str = "") -> Answer:
        """A raw PUT whose status the caller interprets (py-consul's callbacks turn some
        answers we need to tell apart into one exception)."""
        client = self.client
        response: Response = await self._call(client.http.put(
            lambda response: response, path, params=params or [], data=body,
            headers=client.prepare_headers()))
        return Answer(response.code, response.body)

    # -- reading -----------------------------------------------------------------------
    def _snapshot(self, index: str | int, items: list[dict[str, Any]] | None) -> RegionMap:
        regions: dict[str, Region] = {}
        shards: dict[str, Shard] = {}
        placements: dict[str, str] = {}
        placement_lsns: dict[str, str] = {}
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
                    if lsn := doc.get("sinceLsn"):
                        placement_lsns[name] = str(lsn)
                else:
                    record = _RECORDS[kind].from_json(doc)
                    if record.name != name:
                        raise ValueError(f"record named {record.name!r}")
                    (regions if kind == "regions" else shards)[name] = record
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # One bad record must not hide the whole map. A region or placement
                # stays writable by CAS; a shard must be readable to check its epoch.
                log.warning("skipping malformed region map record %s: %s", item["Key"], exc)
        return RegionMap(regions, shards, placements, int(index), key_indexes, placement_lsns)

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

    async def read_regions(self) -> dict[str, Region]:
        index, items = await self._call(self.client.kv.get(self.prefix + "regions/", recurse=True))
        return dict(self._snapshot(index, items).regions)

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

    async def _write_shard(self, shard: Shard, expected_index: int) -> None:
        await self._cas_put(shard_key(shard.name), shard.to_json(), expected_index)

    async def place_event(self, event_id: str, shard: str, expected_index: int,
                          since_lsn: str | None = None) -> None:
        value = Placement(event_id, shard, since_lsn).to_json()
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
        await self._call(self.client.kv.delete(self.ops_prefix, recurse=True))

    # -- operation journals --------------------------------------------------------------
    async def put_journal(self, op_id: str, doc: dict[str, Any], expected_index: int) -> int:
        if expected_index < 0:
            raise ValueError(f"expected index must be >= 0, not {expected_index}")
        key = self.ops_prefix + journal_key(op_id)
        body = json.dumps(doc, sort_keys=True).encode()
        # A one-operation transaction: the same check-and-set as `PUT ?cas=`, but its
        # answer carries the entry's new ModifyIndex (a plain PUT answers only true).
        # Flags carry the base index, as in `_cas_put`, so every success is a change.
        op = {"KV": {"Verb": "cas", "Key": key, "Value": base64.b64encode(body).decode(),
                     "Flags": int(expected_index), "Index": int(expected_index)}}
        response = await self._put("/v1/txn", body=json.dumps([op]))
        if response.code == 409:  # the transaction was rolled back: the index is stale
            raise CasConflict(key, expected_index)
        if response.code != 200:
            raise MapError(f"journal write {key}: consul answered {response.code}")
        try:
            return int(json.loads(response.body)["Results"][0]["KV"]["ModifyIndex"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise MapError(f"journal write {key}: unexpected answer {response.body!r}") from exc

    async def read_journal(self, op_id: str) -> tuple[dict[str, Any], int]:
        key = self.ops_prefix + journal_key(op_id)
        _, item = await self._call(self.client.kv.get(key))
        if item is None or item.get("Value") is None:
            raise NotFound(f"no journal {op_id}")
        return self._journal(item)

    def _journal(self, item: dict[str, Any]) -> tuple[dict[str, Any], int]:
        try:
            doc = json.loads(item["Value"])
        except ValueError as exc:
            raise MapError(f"malformed journal at {item['Key']}: {exc}") from exc
        if not isinstance(doc, dict):
            raise MapError(f"malformed journal at {item['Key']}: not an object")
        return doc, int(item["ModifyIndex"])

    async def list_journals(self, kind_prefix: str = "") -> dict[str, tuple[dict[str, Any], int]]:
        if "/" in kind_prefix:
            raise ValueError(f"invalid operation id prefix: {kind_prefix!r}")
        base = self.ops_prefix + "journals/"
        _, items = await self._call(self.client.kv.get(base + kind_prefix, recurse=True))
        journals: dict[str, tuple[dict[str, Any], int]] = {}
        for item in items or []:
            op_id = item["Key"][len(base):]
            if not op_id or "/" in op_id or item.get("Value") is None:
                continue
            try:
                journals[op_id] = self._journal(item)
            except MapError as exc:  # one bad journal must not hide the others
                log.warning("skipping %s", exc)
        return journals

    async def delete_journal(self, op_id: str, expected_index: int) -> None:
        if expected_index <= 0:
            raise ValueError("removing a journal needs its current modify index")
        key = self.ops_prefix + journal_key(op_id)
        if not await self._call(self.client.kv.delete(key, cas=int(expected_index))):
            raise CasConflict(key, expected_index)

    # -- sessions and locks --------------------------------------------------------------
    async def create_session(self, name: str, ttl_seconds: float) -> str:
        # TTL only (no node checks: the holder proves it lives by renewing), released
        # locks free at once (LockDelay 0; Consul's default would hold them 15 s).
        # py-consul's session.create refuses a TTL under 10 s, hence the raw call.
        spec = {"Name": name, "TTL": f"{round(ttl_seconds * 1000)}ms", "LockDelay": "0s",
                "Behavior": "release", "Checks": []}
        response = await self._put("/v1/session/create", body=json.dumps(spec))
        if response.code != 200:  # e.g. a TTL below the agent's session_ttl_min
            raise MapError(f"consul refused session {name!r}: {response.code} {response.body}")
        try:
            return str(json.loads(response.body)["ID"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MapError(f"session {name!r}: unexpected answer {response.body!r}") from exc

    async def renew_session(self, session_id: str) -> bool:
        response = await self._put(f"/v1/session/renew/{check_name('session', session_id)}")
        if response.code == 404:
            return False
        if response.code != 200:
            raise MapError(f"renewing session {session_id}: consul answered {response.code}")
        return True

    async def destroy_session(self, session_id: str) -> None:
        await self._call(self.client.session.destroy(check_name("session", session_id)))

    async def acquire_lock(self, name: str, session_id: str, value: dict[str, Any]) -> bool:
        key = self.ops_prefix + lock_key(name)
        response = await self._put(f"/v1/kv/{key}", [("acquire", session_id)],
                                   json.dumps(value, sort_keys=True))
        if response.code == 500 and "invalid session" in response.body:
            raise SessionGone(f"session {session_id} is gone: lock {name} not taken")
        if response.code != 200:
            raise MapError(f"acquiring lock {key}: consul answered {response.code}")
        return response.body.strip() == "true"

    async def acquire_lock_sequenced(self, name: str, session_id: str,
                                     value: dict[str, Any]) -> int:
        key = self.ops_prefix + lock_key(name)
        body = json.dumps(value, sort_keys=True).encode()
        # A one-operation transaction (the `lock` verb is `PUT ?acquire=`): its answer
        # carries the entry as written, so the lock's ModifyIndex at this acquisition
        # comes back in the same round trip: the lease's sequencer. It is a raft index,
        # so it only grows, even across a delete and re-creation of the key.
        op = {"KV": {"Verb": "lock", "Key": key, "Value": base64.b64encode(body).decode(),
                     "Session": session_id}}
        response = await self._put("/v1/txn", body=json.dumps([op]))
        if response.code == 409:  # rolled back: held by another session, or ours is gone
            if "invalid session" in response.body:
                raise SessionGone(f"session {session_id} is gone: lock {name} not taken")
            return 0
        if response.code == 500 and "invalid session" in response.body:
            raise SessionGone(f"session {session_id} is gone: lock {name} not taken")
        if response.code != 200:
            raise MapError(f"acquiring lock {key}: consul answered {response.code}")
        try:
            return int(json.loads(response.body)["Results"][0]["KV"]["ModifyIndex"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise MapError(f"acquiring lock {key}: unexpected answer {response.body!r}") from exc

    async def release_lock(self, name: str, session_id: str) -> bool:
        key = self.ops_prefix + lock_key(name)
        _, item = await self._call(self.client.kv.get(key))
        if item is None or item.get("Session") != session_id:
            return False
        # The value is written back as it was; Consul releases only for the holder.
        value = (item.get("Value") or b"").decode()
        response = await self._put(f"/v1/kv/{key}", [("release", session_id)], value)
        if response.code != 200:
            raise MapError(f"releasing lock {key}: consul answered {response.code}")
        return response.body.strip() == "true"

    async def lock_holder(self, name: str) -> LockState:
        return await self.watch_lock(name, 0)

    async def watch_lock(self, name: str, index: int, wait_seconds: float = 30.0) -> LockState:
        key = self.ops_prefix + lock_key(name)
        wait = min(max(wait_seconds, 0.05), MAX_WAIT)
        budget = wait + wait / 16 + self.timeout
        index_out, item = await self._call(
            self.client.kv.get(key, index=index or None, wait=f"{round(wait * 1000)}ms",
                               connections_timeout=budget),
            timeout=budget,
        )
        if item is None:
            return LockState(None, None, int(index_out))
        try:
            value = json.loads(item["Value"]) if item.get("Value") else None
        except ValueError:
            value = None  # not ours to judge: the holder is what matters
        return LockState(item.get("Session"), value if isinstance(value, dict) else None,
                         int(index_out))

    # -- service registry --------------------------------------------------------
    async def register_service(
        self, service: str, instance_id: str, address: str, port: int, tags: list[str],
        health_url: str | None, url: str = "", meta: Mapping[str, str] | None = None,
    ) -> None:
        check = None if health_url is None else consul.Check.http(
            health_url, CHECK_INTERVAL, timeout=CHECK_INTERVAL, deregister=DEREGISTER_AFTER)
        all_meta = {**(meta or {}), **({"url": url} if url else {})}
        ok = await self._call(self.client.agent.service.register(
            service, service_id=instance_id, address=address, port=port, tags=list(tags),
            check=check, meta=all_meta or None,
        ))
        if not ok:
            raise MapError(f"consul refused to register {instance_id}")

    async def deregister_service(self, instance_id: str) -> None:
        # Idempotent: an unknown id is already gone. Consul 1.8 answers 200 for one without
        # ACLs, but 500 "Unknown service" with them (it looks the service up to check the
        # token's rights on it); later versions answer 404.
        response = await self._put(f"/v1/agent/service/deregister/{check_name('instance', instance_id)}")
        if response.code == 200 or response.code == 404 or "Unknown service" in response.body:
            return
        raise MapError(f"deregistering {instance_id}: consul answered {response.code} {response.body}")

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
                meta={str(k): str(v) for k, v in (e["Service"].get("Meta") or {}).items()},
            )
            for e in entries or []
        ]

    async def close(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.close()
