"""Authenticated internal traffic: HMAC-signed requests between the cluster's processes.

Every call between processes (gateway -> booking service, controller -> node agent,
operator tools -> node agents and booking services, the console -> node agents and the
controller's `/status`) carries one header its receiver checks before routing:

    X-Boxoffice-Signature: v1;<kind>;<name>;<unix seconds>;<nonce, 32 hex>;<MAC, 64 hex>

Rules:
- Each kind of caller (`KINDS`: gateway, controller, agent, service, operator) signs with
  a key of its own. The launcher derives them from one cluster master key it keeps
  (`derive_key`: HMAC-SHA256(master, "boxoffice-internal/" + kind)); the operator's key is
  derived from the operator token (`operator_key`), so a receiver can verify an operator
  without holding the token. A process gets its own signing key (`KIND_ENV`, `KEY_ENV`)
  and only the verification keys of the kinds allowed to call it (`VERIFY_ENV`):
  deploy/cluster.py `Cluster.component_env`.
- The MAC (HMAC-SHA256, compared in constant time) covers the method, the path and query
  exactly as sent, the SHA-256 of the body, the caller's kind and name, the timestamp and
  the nonce: a signature is good for that one request only.
- Each route names the kinds it accepts (a `Policy`); `None` means open (liveness for
  Consul's checks, which reveals nothing but up/down). Callers are authenticated before
  routing, so a path no route names is refused like the others under the same prefix
  (a node agent's or a controller's every path; a booking service's `/api`, `/admin`,
  `/shards`).
- Freshness: the timestamp must be within `WINDOW_SECONDS` of the receiver's own clock,
  and a nonce seen inside the window is refused (`NonceCache`, bounded: when full it
  refuses, 503, rather than forget). This clock is used only to bound how long a captured
  request could be replayed; no failover decision reads it (those use the observer's
  time.monotonic()). A host whose clock is off by more than the window has its calls
  refused (fail closed): keep hosts' clocks synchronised (NTP).
- `Authorization: Bearer <operator token>` is still accepted where the route accepts the
  operator kind (verified against the operator's derived key: the receiver never needs
  the token). That is for a person calling a known address (curl); no client of this
  code base sends the token to an address read from Consul: they sign.
- Missing, malformed (non-ASCII, over-long, wrong form), stale, replayed, forged, or of a
  kind the route does not accept: a 401 (403 for a valid caller of the wrong kind)
  problem document, never a 500. A browser cannot produce a signature, so a page's
  `fetch` or form POST (text/plain included) to an internal port is refused.
- A metrics listener whose process has a scrape token (`METRICS_TOKEN_ENV`; `up` gives
  every kind one) takes only `Authorization: Bearer <it>` (constant time); Prometheus
  sends it from `authorization: credentials_file`.
- A booking service given no verification key at all refuses to start (fail closed;
  `boxoffice up` always configures them), unless `BOXOFFICE_INTERNAL_AUTH=off` says it
  may run without (a test's stand-alone service, a laptop): then it does not
  authenticate its callers and says so in its log at start. A node agent without keys
  still hears the operator (its key derived from the operator token) and no one else.

Metrics: `boxoffice_internal_auth_total{result}` (accepted, refused reasons).
Tests: tests/test_internal_auth.py (the attacks against a running cluster),
tests/test_internal_auth_logic.py (signing and verification).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from prometheus_client import Counter
from yarl import URL

from common.problems import Problem

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger("boxoffice.internal_auth")

SIGNATURE_HEADER = "X-Boxoffice-Signature"
KIND_ENV = "BOXOFFICE_INTERNAL_KIND"  # this process's kind of caller
KEY_ENV = "BOXOFFICE_INTERNAL_KEY"  # its signing key, hex
VERIFY_ENV = "BOXOFFICE_INTERNAL_VERIFY"  # "kind=hexkey,kind=hexkey": whom it may hear from
METRICS_TOKEN_ENV = "BOXOFFICE_METRICS_TOKEN"  # bearer token of the metrics listeners
INSECURE_ENV = "BOXOFFICE_INTERNAL_AUTH"  # "off": a booking service may run without keys

KINDS = ("gateway", "controller", "agent", "service", "operator")
# Which kinds of caller may call each kind of process at all (each route narrows it):
# the verification keys the launcher gives it.
CALLERS_OF = {
    "agent": ("controller", "operator"),
    "service": ("gateway", "controller", "operator"),
    "controller": ("gateway", "operator"),
    "gateway": (),
}
WINDOW_SECONDS = 60.0
MAX_NONCES = 1_000_000
MAX_HEADER_LENGTH = 256
DEFAULT_MAX_BODY = 1024 * 1024  # bytes read to verify a signature (a route's own limit may be lower)
_VERSION = "v1"
_LABEL = b"boxoffice-internal/"
_NAME = r"[A-Za-z0-9._:@/\[\]-]{1,64}"
_FORM = re.compile(rf"v1;([a-z]{{1,16}});({_NAME});([0-9]{{1,12}});([0-9a-f]{{32}});([0-9a-f]{{64}})")

AUTH_RESULTS = Counter("boxoffice_internal_auth_total",
                       "Internal requests by the result of their authentication", ["result"])


def derive_key(master: bytes, kind: str) -> bytes:
    """The signing key of one kind of process, from the cluster's master key."""
    return hmac.new(master, _LABEL + kind.encode(), hashlib.sha256).digest()


def process_env(kind: str, master: bytes, operator_token: str) -> dict[str, str]:
    """The environment a process of `kind` gets (deploy/cluster.py `component_env`): its
    own signing key and the verification keys of the kinds that may call it. The master
    key stays with the launcher; the operator's key is derived from the token."""
    verify = {k: operator_key(operator_token) if k == "operator" else derive_key(master, k)
              for k in CALLERS_OF.get(kind, ())}
    env = {KIND_ENV: kind, KEY_ENV: derive_key(master, kind).hex()}
    if verify:
        env[VERIFY_ENV] = format_verify_keys(verify)
    return env


def operator_key(token: str) -> bytes:
    """The operator's signing key, from the operator token (verifiable without it)."""
    return hmac.new(token.encode(), _LABEL + b"operator", hashlib.sha256).digest()


def _message(method: str, path_qs: str, body: bytes, kind: str, name: str, ts: str, nonce: str) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join(("boxoffice-internal", _VERSION, method.upper(), path_qs, digest,
                      kind, name, ts, nonce)).encode("utf-8", "surrogateescape")


def _default_name() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}.{os.getpid()}")[:64]


@dataclass(frozen=True)
class Signer:
    """A caller's credential: its kind, a name for the receiver's log, and its key."""

    kind: str
    key: bytes
    name: str = ""

    @classmethod
    def operator(cls, token: str, name: str = "") -> Signer:
        return cls("operator", operator_key(token), name or _default_name())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Signer | None:
        """This process's own credential (`KIND_ENV`, `KEY_ENV`), or None."""
        env = os.environ if environ is None else environ
        kind, key = env.get(KIND_ENV, ""), env.get(KEY_ENV, "")
        if kind not in KINDS or not key:
            return None
        return cls(kind, bytes.fromhex(key), _default_name())

    def sign(self, method: str, url: str | URL, body: bytes = b"", *,
             now: float | None = None, nonce: str | None = None) -> dict[str, str]:
        """The header that authenticates this one request (`url`: as it will be sent)."""
        path_qs = URL(url).raw_path_qs if isinstance(url, str) else url.raw_path_qs
        ts = str(int(time.time() if now is None else now))
        nonce = nonce or secrets.token_hex(16)
        name = self.name or _default_name()
        mac = hmac.new(self.key, _message(method, path_qs, body, self.kind, name, ts, nonce),
                       hashlib.sha256).hexdigest()
        return {SIGNATURE_HEADER: ";".join((_VERSION, self.kind, name, ts, nonce, mac))}


def parse_verify_keys(text: str) -> dict[str, bytes]:
    """`VERIFY_ENV`'s value: {kind: key}. Raises ValueError on a malformed entry."""
    keys: dict[str, bytes] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        kind, _, key = entry.partition("=")
        if kind not in KINDS or not key:
            raise ValueError(f"{VERIFY_ENV}: {kind!r} is not a kind of caller with a key")
        keys[kind] = bytes.fromhex(key)
    return keys


def format_verify_keys(keys: Mapping[str, bytes]) -> str:
    return ",".join(f"{kind}={key.hex()}" for kind, key in sorted(keys.items()))


@dataclass(frozen=True)
class Caller:
    """Who an authenticated internal request came from."""

    kind: str
    name: str
    bearer: bool = False  # the operator token itself, not a signature


CALLER = web.RequestKey("boxoffice-internal-caller", Caller)  # the authenticated `Caller`


def request_caller(request: web.Request) -> Caller | None:
    return request.get(CALLER)


class NonceCache:
    """Nonces seen within the window, by the second their (signed) timestamp names: a
    replay carries the same timestamp, so only that second's set is looked in, and a
    second's set is dropped whole once it is out of the window."""

    def __init__(self, window: float = WINDOW_SECONDS, capacity: int = MAX_NONCES) -> None:
        self.window = window
        self.capacity = capacity
        self._by_second: dict[int, set[str]] = {}
        self._size = 0
        self._next_purge = 0.0

    def add(self, nonce: str, ts: int, now: float) -> bool:
        """Remember `nonce`; False when it was seen already. Raises a 503 when full."""
        if now >= self._next_purge:
            for second in [s for s in self._by_second if s < now - self.window - 1]:
                self._size -= len(self._by_second.pop(second))
            self._next_purge = now + 1.0
        seen = self._by_second.setdefault(ts, set())
        if nonce in seen:
            return False
        if self._size >= self.capacity:
            AUTH_RESULTS.labels("nonce-cache-full").inc()
            raise Problem(503, "busy", "Too many internal requests to check for replays; retry.",
                          headers={"Retry-After": "1"})
        seen.add(nonce)
        self._size += 1
        return True


def _refuse(status: int, reason: str, detail: str) -> Problem:
    AUTH_RESULTS.labels(reason).inc()
    kind = "unauthenticated" if status == 401 else "forbidden"
    return Problem(status, kind, detail,
                   headers={"WWW-Authenticate": 'Boxoffice-HMAC realm="boxoffice-internal"'}
                   if status == 401 else None)


class Verifier:
    """A receiver's check: the verification keys it holds, its clock window, its nonces."""

    def __init__(self, keys: Mapping[str, bytes], *, window: float = WINDOW_SECONDS,
                 clock: Callable[[], float] = time.time, capacity: int = MAX_NONCES) -> None:
        self.keys = dict(keys)
        self.window = window
        self.clock = clock
        self.nonces = NonceCache(window, capacity)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Verifier | None:
        """The keys this process was given (`VERIFY_ENV`), or None when it has none."""
        env = os.environ if environ is None else environ
        keys = parse_verify_keys(env.get(VERIFY_ENV, ""))
        return cls(keys) if keys else None

    async def authenticate(self, request: web.Request, kinds: frozenset[str],
                           max_body: int = DEFAULT_MAX_BODY) -> Caller:
        """The caller of `request` if it is one of `kinds`; a 401/403 problem otherwise."""
        header = request.headers.get(SIGNATURE_HEADER)
        if header is None:
            bearer = self.bearer(request)
            if bearer is not None and "operator" in kinds:
                AUTH_RESULTS.labels("accepted").inc()
                return bearer
            if request.headers.get("Authorization", "").lower().startswith("bearer "):
                raise _refuse(403, "bad-bearer", "That operator token is not valid here.")
            raise _refuse(401, "missing", f"This is an internal API: sign the request ({SIGNATURE_HEADER}).")
        if len(header) > MAX_HEADER_LENGTH or not header.isascii():
            raise _refuse(401, "malformed", f"The {SIGNATURE_HEADER} header is not valid.")
        found = _FORM.fullmatch(header)
        if found is None:
            raise _refuse(401, "malformed", f"The {SIGNATURE_HEADER} header is not valid.")
        kind, name, ts_text, nonce, mac = found.groups()
        key = self.keys.get(kind)
        if key is None:
            raise _refuse(401, "unknown-kind", "That kind of caller is not known here.")
        now = self.clock()
        ts = int(ts_text)
        if abs(now - ts) > self.window:
            raise _refuse(401, "stale", "The signature's time is outside the accepted window.")
        body = await _read_body(request, max_body)
        expected = hmac.new(key, _message(request.method, request.raw_path, body, kind, name,
                                          ts_text, nonce), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), mac.encode()):
            raise _refuse(401, "bad-signature", "The request's signature is not valid.")
        if kind not in kinds:
            raise _refuse(403, "wrong-kind", f"A {kind} may not call this route.")
        if not self.nonces.add(nonce, ts, now):
            raise _refuse(401, "replayed", "This request was already received.")
        AUTH_RESULTS.labels("accepted").inc()
        return Caller(kind, name)

    def bearer(self, request: web.Request) -> Caller | None:
        """`Authorization: Bearer <operator token>`, checked against the operator's key."""
        key = self.keys.get("operator")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if key is None or scheme.lower() != "bearer" or not given or len(given) > MAX_HEADER_LENGTH:
            return None
        derived = hmac.new(given.encode("utf-8", "surrogateescape"), _LABEL + b"operator",
                           hashlib.sha256).digest()
        return Caller("operator", "bearer", bearer=True) if hmac.compare_digest(derived, key) else None


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body (at most `limit` bytes, else 413), read once to be verified, and put back
    for the handler's own reading (`request.content` and `request.read()` give it again)."""
    too_large = Problem(413, "body-too-large", f"The body may be at most {limit} bytes.")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    raw = bytearray()
    try:
        # The payload itself: `request.content` is cached on first use, and the handler's
        # must be the stream put back below.
        async for chunk in request._payload.iter_chunked(65536):
            raw += chunk
            if len(raw) > limit:
                raise too_large
    except (HttpProcessingError, ConnectionError):
        raise Problem(400, "unreadable-body",
                      "The request body could not be read: broken framing, or cut short.") from None
    body = bytes(raw)
    # A buffer limit above the body's size: holding it never pauses the connection.
    reader = StreamReader(request.protocol, max(len(body), 2**16), loop=asyncio.get_running_loop())
    if body:
        reader.feed_data(body)
    reader.feed_eof()
    request._payload = reader
    return body


# A route's accepted kinds (None: open), by method and path.
Policy = Callable[[str, str], frozenset[str] | None]


def middleware(verifier: Verifier | None, policy: Policy,
               max_body: Callable[[str], int] = lambda _: DEFAULT_MAX_BODY) -> Middleware:
    """Authenticate every request before routing, as `policy` says. A signed request to an
    open route is verified too, and the operator's bearer token recognised there (its
    caller may see more: a booking service's readiness detail). Without a verifier (a process
    given no keys) nothing is checked: see the module's rules. `max_body(path)`: the most
    bytes of a body read to verify it (a signed body is read before the handler)."""

    @web.middleware
    async def internal_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if verifier is None:
            return await handler(request)
        kinds = policy(request.method, request.path)
        if kinds is not None or SIGNATURE_HEADER in request.headers:
            request[CALLER] = await verifier.authenticate(request, kinds or frozenset(KINDS),
                                                          max_body(request.path))
        elif (bearer := verifier.bearer(request)) is not None:  # an open route: more detail
            request[CALLER] = bearer
        return await handler(request)

    return internal_auth


class NoKeys(RuntimeError):
    """A process that must authenticate its callers was given no keys (fail closed)."""


def verifier_or_refuse(what: str, environ: Mapping[str, str] | None = None) -> Verifier | None:
    """This process's verifier. Without keys it refuses to run (`NoKeys`): a booking
    service started by hand without them would take any local caller's writes. Unless
    `INSECURE_ENV` says "off" (a test's stand-alone service, a laptop): then it runs
    without authenticating its callers (None) and says so in its log."""
    env = os.environ if environ is None else environ
    verifier = Verifier.from_environment(env)
    if verifier is not None:
        return verifier
    if env.get(INSECURE_ENV, "").strip().lower() == "off":
        log.warning(f"{what}: {INSECURE_ENV}=off and no internal verification keys: callers "
                    "are NOT authenticated")
        return None
    raise NoKeys(f"{what}: no internal verification keys (${VERIFY_ENV}): refusing to run "
                 f"without authenticating its callers. `boxoffice up` configures them; "
                 f"{INSECURE_ENV}=off runs without (tests, a laptop)")


def metrics_middleware(token: str | None = None, path: str | None = None) -> Middleware:
    """Metrics listeners (`path` only, else every route): `Authorization: Bearer <scrape
    token>` when one is configured (`token`, else `METRICS_TOKEN_ENV`)."""
    expected = token if token is not None else os.environ.get(METRICS_TOKEN_ENV, "")

    @web.middleware
    async def scrape_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected and (path is None or request.path == path):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.encode("utf-8", "surrogateescape"), expected.encode()):
                raise _refuse(401, "metrics-token",
                              "Send the scrape token as 'Authorization: Bearer <token>'.")
        return await handler(request)

    return scrape_auth


def scrape_request(url: str) -> urllib.request.Request:
    """A GET of a metrics listener carrying this process's scrape token (`METRICS_TOKEN_ENV`;
    none when it has none): for operator tools that start a cluster and read its
    metrics, having given the cluster that token (`Cluster.metrics_token` takes it)."""
    token = os.environ.get(METRICS_TOKEN_ENV, "")
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})


def own_scrape_token() -> str:
    """This process's scrape token, made (and put in its environment, for the clusters it
    starts) when it has none."""
    import secrets

    return os.environ.setdefault(METRICS_TOKEN_ENV, secrets.token_urlsafe(32))


def signed_body(body: object) -> bytes:
    """A JSON body as the bytes that are signed and sent."""
    import json

    return b"" if body is None else json.dumps(body).encode()
