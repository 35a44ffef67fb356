"""Operator calls to booking services, as event creation and event moves make them.

- Every call is signed (common/internal_auth.py) as the operator, with the key derived
  from the operator token (the token never leaves the process: service addresses come
  from the map), or with the caller's own credential (`signer`: a controller's). It
  carries the request id of the operation, and the
  epoch the caller routed by (`X-Boxoffice-Epoch`): a booking service refuses a write
  under an epoch that is not its database's (fencing, docs/failover.md), so an operation
  that read an old map never writes through a demoted copy.
- Answers come back as `AdminAnswer` (status, JSON document, headers) whatever the
  status: what a 4xx means is the caller's business. No answer at all (no connection, a
  timeout) is `ShardUnreachable`: nothing is known about what the call did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from yarl import URL

from common.fencing import EPOCH_HEADER
from common.internal_auth import Signer, signed_body
from common.logs import REQUEST_ID_HEADER, request_id_var
from common.sequencer import SEQUENCER_HEADER
from region_map import ShardMember

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class AdminAnswer:
    status: int
    doc: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def problem_type(self) -> str:
        """The last segment of a problem document's `type` ("" for other answers)."""
        return str(self.doc.get("type", "")).rsplit("/", 1)[-1]


class ShardUnreachable(Exception):
    """A booking service did not answer (no connection, or a timeout)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.detail = detail


class ShardAdmin:
    """One HTTP session for an operation's calls to booking services."""

    def __init__(self, token: str | Signer, *, timeout: float = DEFAULT_TIMEOUT,
                 address_rewrites: dict[str, str] | None = None) -> None:
        self.signer = token if isinstance(token, Signer) else Signer.operator(token)
        self.timeout = timeout
        self.address_rewrites = dict(address_rewrites or {})
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ShardAdmin:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _url(self, base: str) -> str:
        """The address to dial: a gateway's simulated network (delay proxies) applies."""
        parts = urlsplit(base)
        netloc = self.address_rewrites.get(parts.netloc, parts.netloc)
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    async def call(
        self, method: str, member: ShardMember, path: str, *, epoch: int | None = None,
        body: Any = None, params: dict[str, str] | None = None, timeout: float | None = None,
        sequencer: str | None = None,
    ) -> AdminAnswer:
        if self._session is None:
            # every request passes its own total timeout; this default bounds any other
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        url = URL(self._url(member.service_url).rstrip("/") + path)
        if params:
            url = url.update_query(params)
        data = signed_body(body)
        headers = self.signer.sign(method, url, data)
        if data:
            headers["Content-Type"] = "application/json"
        if epoch is not None:
            headers[EPOCH_HEADER] = str(epoch)
        if sequencer is not None:
            headers[SEQUENCER_HEADER] = sequencer
        if (rid := request_id_var.get(None)) is not None:
            headers[REQUEST_ID_HEADER] = rid
        try:
            async with self._session.request(
                method, url, data=data or None, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as resp:
                raw = await resp.read()
                try:
                    doc = json.loads(raw) if raw else {}
                except ValueError:
                    doc = {"detail": raw[:200].decode(errors="replace")}
                if not isinstance(doc, dict):
                    doc = {"items": doc}
                return AdminAnswer(resp.status, doc, dict(resp.headers))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ShardUnreachable(member.service_url, f"{type(exc).__name__}: {exc}") from None
