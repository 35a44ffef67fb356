"""A small client for the node agents' primitives (node_agent/api.py), as the promotion
and the failover controller call them.

- An agent is found through the service registry: the `node-agent` instances
  (`region_map.NODE_AGENT_SERVICE`), each tagged `host=<host key>` (a host key is a copy
  key: `us-east`, `us-east/b`) and registered with its base URL. The copy of shard S
  on host H is the shard record's member H.
- Every call is signed (common/internal_auth.py): as the operator, with the key derived
  from the operator token it is given (the token itself never leaves the process: the
  addresses come from the registry, which is not trusted with it), or with the caller's
  own credential (`signer`, a controller's). Every call has a short timeout (a promotion has to decide
  quickly that a host is gone); `pg_promote` gets a longer one.
- Failures become typed exceptions: `AgentUnreachable` (no agent registered for the
  host, no connection, a timeout: nothing is known about the copy), `AgentRefused` (a
  4xx problem: the primitive does not apply, e.g. `not-a-standby`), `AgentFailed` (a
  5xx problem: the agent answered but its database did not).
- Bound to a lease (`under_lease`, where a promotion or switchover takes its shard's
  lease), every primitive that changes a server (promote, repoint, sync set, stop,
  start) carries the lease's sequencer (`X-Boxoffice-Sequencer`): an agent that has
  seen a newer one for that lease refuses it (409 `stale-sequencer`, an
  `AgentRefused`), so a runner that lost its lease changes no server
  (node_agent/sequencers.py). Status reads carry none.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import aiohttp
from yarl import URL

from common.internal_auth import Signer, signed_body
from common.lsn import optional_lsn_to_int
from common.sequencer import SEQUENCER_HEADER
from region_map import NODE_AGENT_SERVICE, MapError, MapStore

if TYPE_CHECKING:
    from failover.lease import Lease

HOST_TAG = "host="
STATUS_TIMEOUT = 2.0  # GET /agent/copies: positions are a few queries
PRIMITIVE_TIMEOUT = 10.0  # repoint, sync (ALTER SYSTEM + reload)
# promote: pg_promote(wait => true) (the agent allows 60 s), then the epoch row, whose
# commit waits for the new primary's synchronous standby.
PROMOTE_TIMEOUT = 120.0


def application_name(shard: str, copy: str) -> str:
    """A copy's Postgres application_name, which synchronous_standby_names lists: the
    launcher's convention (deploy.cluster.server_name, `shard-1-us-east-b`). The name an
    agent reports for its copy (`CopyStatus.name`) wins over it."""
    return f"{shard}-{copy.replace('/', '-')}"


class AgentError(Exception):
    """A node agent call did not do what was asked."""

    def __init__(self, host: str, detail: str) -> None:
        super().__init__(f"node agent {host}: {detail}")
        self.host = host
        self.detail = detail


class AgentUnreachable(AgentError):
    """No answer: no agent registered for the host, no connection, or a timeout."""


class AgentRefused(AgentError):
    """A 4xx problem: the primitive does not apply to the copy as it is (`kind`)."""

    def __init__(self, host: str, status: int, kind: str, detail: str) -> None:
        super().__init__(host, f"{status} {kind}: {detail}")
        self.status = status
        self.kind = kind


class AgentFailed(AgentError):
    """A 5xx problem: the agent answered, the copy's database did not (`kind`)."""

    def __init__(self, host: str, status: int, kind: str, detail: str) -> None:
        super().__init__(host, f"{status} {kind}: {detail}")
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class CopyStatus:
    """One copy as its agent reports it (GET /agent/copies)."""

    host: str
    shard: str
    name: str  # the server's application_name
    running: bool
    role: str | None  # "primary" / "standby" from pg_is_in_recovery(); None: not answering
    timeline: int | None = None
    flush_lsn: str | None = None  # on a primary
    receive_lsn: str | None = None  # on a standby
    replay_lsn: str | None = None  # on a standby
    streaming: bool = False
    epoch: int | None = None  # the epoch row

    @property
    def position_lsn(self) -> str | None:
        """The furthest WAL the copy holds durably: flush on a primary, the larger of
        received and replayed on a standby."""
        if self.role == "primary":
            return self.flush_lsn
        pair = [p for p in (self.receive_lsn, self.replay_lsn) if p]
        return max(pair, key=lambda p: optional_lsn_to_int(p) or 0) if pair else None

    @property
    def position(self) -> int | None:
        return optional_lsn_to_int(self.position_lsn)

    @property
    def replayed_all(self) -> bool:
        """A standby that has replayed everything it received."""
        replay, receive = optional_lsn_to_int(self.replay_lsn), optional_lsn_to_int(self.receive_lsn)
        return replay is not None and (receive is None or replay >= receive)

    @classmethod
    def from_json(cls, host: str, doc: Mapping[str, Any]) -> CopyStatus:
        pos = doc.get("positions") or {}
        epoch = doc.get("epoch")
        timeline = doc.get("timeline")
        return cls(
            host=host, shard=str(doc["shard"]), name=str(doc.get("name") or ""),
            running=bool(doc.get("running")), role=doc.get("role") if doc.get("running") else None,
            timeline=int(timeline) if timeline is not None else None,
            flush_lsn=pos.get("flush_lsn"), receive_lsn=pos.get("receive_lsn"),
            replay_lsn=pos.get("replay_lsn"), streaming=bool(pos.get("streaming")),
            epoch=int(epoch) if epoch is not None else None,
        )


class StatusSource(Protocol):
    """Anything that reports a copy's status (`NodeAgents`, a promotion's agents, fakes)."""

    async def copy_status(self, host: str, shard: str) -> CopyStatus: ...


async def copy_statuses(agents: StatusSource, keys: Iterable[str],
                        shard: str) -> dict[str, CopyStatus | AgentError]:
    """The status of each copy in `keys` of `shard`, asked at once: a copy whose agent
    failed or refused has its `AgentError` for an answer; anything else raises."""
    keys = list(keys)
    results = await asyncio.gather(*(agents.copy_status(k, shard) for k in keys),
                                   return_exceptions=True)
    out: dict[str, CopyStatus | AgentError] = {}
    for key, result in zip(keys, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, AgentError):
            raise result
        out[key] = result
    return out


class Agents(Protocol):
    """What a promotion needs from the node agents (`NodeAgents`; tests use fakes)."""

    async def copy_status(self, host: str, shard: str) -> CopyStatus: ...

    async def set_sync(self, host: str, shard: str, standbys: list[str], mode: str) -> str: ...

    async def repoint(self, host: str, shard: str, primary: str) -> bool: ...

    async def promote(self, host: str, shard: str, epoch: int) -> dict[str, Any]: ...


class NodeAgents:
    """The node agents of a cluster, found through the registry, called over HTTP."""

    def __init__(self, store: MapStore, token: str | Signer, *, status_timeout: float = STATUS_TIMEOUT,
                 primitive_timeout: float = PRIMITIVE_TIMEOUT,
                 promote_timeout: float = PROMOTE_TIMEOUT) -> None:
        self.store = store
        self.signer = token if isinstance(token, Signer) else Signer.operator(token)
        self.status_timeout = status_timeout
        self.primitive_timeout = primitive_timeout
        self.promote_timeout = promote_timeout
        self._urls: dict[str, str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._root = self  # a bound view (`bound`) shares its root's session and registry
        self.sequencer: str | None = None  # the lease fence its primitives carry

    def bound(self, fence: str) -> NodeAgents:
        """A view of these agents whose primitives carry `fence` (`Lease.fence`); it
        shares this object's HTTP session and registry (closing it closes nothing)."""
        view = NodeAgents(self.store, self.signer, status_timeout=self.status_timeout,
                          primitive_timeout=self.primitive_timeout,
                          promote_timeout=self.promote_timeout)
        view._root = self._root
        view.sequencer = fence
        return view

    async def close(self) -> None:
        if self._root is not self:
            return
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> NodeAgents:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- finding agents ---------------------------------------------------------------
    async def refresh(self) -> dict[str, str]:
        """Read the registry now: {host key: agent base URL}. A host with several
        instances (a restarted agent registered again) keeps a passing one."""
        if self._root is not self:
            return await self._root.refresh()
        try:
            _, instances = await self.store.watch_instances(NODE_AGENT_SERVICE, 0)
        except MapError as exc:
            raise AgentUnreachable("*", f"the service registry did not answer ({exc})") from exc
        urls: dict[str, tuple[bool, str]] = {}
        for inst in instances:
            host = next((t[len(HOST_TAG):] for t in inst.tags if t.startswith(HOST_TAG)), None)
            url = inst.url or f"http://{inst.address}:{inst.port}"
            if host and (host not in urls or (inst.passing and not urls[host][0])):
                urls[host] = (inst.passing, url.rstrip("/"))
        self._urls = {h: u for h, (_, u) in urls.items()}
        return dict(self._urls)

    async def url_for(self, host: str) -> str:
        if self._root is not self:
            return await self._root.url_for(host)
        if self._urls is None or host not in self._urls:
            await self.refresh()
        assert self._urls is not None
        url = self._urls.get(host)
        if url is None:
            raise AgentUnreachable(host, "no node agent is registered for this host")
        return url

    # -- primitives ---------------------------------------------------------------------
    async def copy_status(self, host: str, shard: str) -> CopyStatus:
        doc = await self._call(host, "GET", f"/agent/copies/{shard}", None, self.status_timeout,
                               fenced=False)
        for copy in doc.get("copies") or []:
            if copy.get("shard") == shard:
                return CopyStatus.from_json(host, copy)
        raise AgentRefused(host, 404, "unknown-copy", f"the agent owns no copy of {shard}")

    async def ping(self, host: str, timeout: float | None = None) -> None:
        """The agent answers its liveness route (nothing probed behind it) within
        `timeout` (default: the status timeout); raises `AgentUnreachable` when it does
        not (host "*": the registry did not answer)."""
        await self._call(host, "GET", "/agent/health", None,
                         self.status_timeout if timeout is None else timeout, fenced=False)

    async def set_sync(self, host: str, shard: str, standbys: list[str], mode: str) -> str:
        doc = await self._call(host, "POST", f"/agent/copies/{shard}/sync",
                               {"standbys": standbys, "mode": mode}, self.primitive_timeout)
        return str(doc.get("synchronousStandbyNames", ""))

    async def repoint(self, host: str, shard: str, primary: str) -> bool:
        doc = await self._call(host, "POST", f"/agent/copies/{shard}/repoint",
                               {"primary": primary}, self.primitive_timeout)
        return bool(doc.get("changed"))

    async def promote(self, host: str, shard: str, epoch: int) -> dict[str, Any]:
        return await self._call(host, "POST", f"/agent/copies/{shard}/promote",
                                {"epoch": epoch}, self.promote_timeout)

    async def stop(self, host: str, shard: str) -> None:
        """Stop the copy's server (fast shutdown); it stays down until `start`."""
        await self._call(host, "POST", f"/agent/copies/{shard}/stop", None, self.promote_timeout)

    async def start(self, host: str, shard: str) -> None:
        """Start the copy in its map role (rewound when needed); returns once it accepts
        connections."""
        await self._call(host, "POST", f"/agent/copies/{shard}/start", None, self.promote_timeout)

    async def _call(self, host: str, method: str, path: str, body: Any,
                    timeout: float, fenced: bool = True) -> dict[str, Any]:
        url = await self.url_for(host)
        root = self._root
        if root._session is None:
            # every request passes its own total timeout; the session's default bounds any
            # call that would not (aiohttp's sessions otherwise have total=300 s)
            root._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=max(self.promote_timeout, self.status_timeout)))
        target = URL(url + path)
        data = signed_body(body)
        headers = self.signer.sign(method, target, data)
        if data:
            headers["Content-Type"] = "application/json"
        if fenced and self.sequencer is not None:
            headers[SEQUENCER_HEADER] = self.sequencer
        try:
            async with root._session.request(
                method, target, data=data or None, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise AgentUnreachable(host, f"{method} {path}: no answer ({exc.__class__.__name__})") from exc
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        if status < 300:
            return doc
        kind = str(doc.get("type", "")).rsplit("/", 1)[-1] or str(status)
        detail = str(doc.get("detail", ""))
        if status >= 500:
            raise AgentFailed(host, status, kind, detail)
        raise AgentRefused(host, status, kind, detail)


A = TypeVar("A")


def under_lease(agents: A, lease: Lease) -> A:
    """`agents` bound to `lease`: node agents whose primitives carry its sequencer
    (`NodeAgents.bound`); any other implementation (a test's fake) as it is."""
    if isinstance(agents, NodeAgents):
        return cast(A, agents.bound(lease.fence))
    return agents
