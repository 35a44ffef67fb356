"""The operator's browser session: a cookie that proves the operator token was presented,
good for viewing the gateway's console and nothing else, until it expires or is revoked.

A browser cannot send `Authorization: Bearer` when it opens a page, so the operator
console (gateway/console.py) has a small sign-in form (`/operator/login`) that posts the
token once; a valid token gets this cookie back:

    boxoffice_operator=v2.<session id, 32 hex>.<expiry, unix seconds>.<HMAC-SHA256 hex>

Rules:
- The MAC is keyed with a key derived from the operator token for this one audience
  (`AUDIENCE`, the gateway's console) over the version, the session id and the expiry.
  Every gateway of the cluster (one token) verifies the cookie of any other; changing
  the token ends every session at once. It is compared in constant time.
- The audience is enforced where requests are authenticated (common/auth.py): the
  cookie opens only `CONSOLE_PATHS` with GET or HEAD (and `POST LOGOUT_PATH`, which
  can only end the session itself), and only on a process that
  registered a `ConsoleSessions` (a gateway serving the console). Booking services, node
  agents, controllers and every other `/admin` route take the bearer header only, so a
  session cannot be turned into an action or carried to an internal API.
- Signing out revokes the session for the whole cluster: its id is recorded (by the
  console, in the cluster's Consul, `Revocations`) until its expiry, and a gateway
  refuses a revoked id. A gateway caches "not revoked" for `NOT_REVOKED_CACHE_SECONDS`
  (so another gateway honours a sign-out within that time) and "revoked" until expiry.
  If the record cannot be read, the cookie is refused (fail closed: the bearer header
  still works).
- The cookie is `HttpOnly` (page scripts never see it), `SameSite=Strict` (no cross-site
  request carries it), `Path=/admin`, `Secure` when the gateway serves HTTPS (or
  BOXOFFICE_COOKIE_SECURE=1), and lasts `SESSION_SECONDS`.

Tests: tests/test_operator_sessions.py (sign-out ends a copied cookie on every gateway;
the cookie is refused by booking services, node agents and non-console routes).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

COOKIE_NAME = "boxoffice_operator"
COOKIE_PATH = "/admin"
SESSION_SECONDS = 8 * 3600  # one shift
SAFE_METHODS = frozenset({"GET", "HEAD"})
AUDIENCE = "gateway-console"
# What the console page loads and polls: the only routes a session opens.
CONSOLE_PATHS = frozenset({"/admin/", "/admin/console.js", "/admin/console.css", "/admin/api/state"})
LOGOUT_PATH = "/admin/logout"  # POST with the session itself: it can only end it
NOT_REVOKED_CACHE_SECONDS = 1.0
_VERSION = "v2"
_FORM = re.compile(r"v2\.([0-9a-f]{32})\.([0-9]{1,12})\.([0-9a-f]{64})")


def _key(token: str) -> bytes:
    """The session key: derived from the operator token, for sessions only."""
    return hmac.new(token.encode(), b"boxoffice operator session key", hashlib.sha256).digest()


def _mac(token: str, session_id: str, expires: int) -> str:
    message = f"{AUDIENCE} {_VERSION} {session_id} {expires}".encode()
    return hmac.new(_key(token), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Session:
    id: str
    expires: int


def issue(token: str, now: float | None = None, lifetime: int = SESSION_SECONDS) -> str:
    """A new session cookie value for the holder of `token`, valid for `lifetime` seconds."""
    expires = int(now if now is not None else time.time()) + lifetime
    session_id = secrets.token_hex(16)
    return f"{_VERSION}.{session_id}.{expires}.{_mac(token, session_id, expires)}"


def verify(value: str | None, token: str | None, now: float | None = None) -> Session | None:
    """The session of a cookie issued with `token`, not expired (revocation not checked);
    None for anything else. Never raises."""
    if not value or not token or len(value) > 200:
        return None
    found = _FORM.fullmatch(value)
    if found is None:
        return None
    session_id, expires_text, mac = found.groups()
    expires = int(expires_text)
    if expires <= (now if now is not None else time.time()):
        return None
    if not hmac.compare_digest(mac.encode(), _mac(token, session_id, expires).encode()):
        return None
    return Session(session_id, expires)


def valid(value: str | None, token: str | None, now: float | None = None) -> bool:
    """Is `value` a session cookie issued with `token` and not expired? (Not revocation.)"""
    return verify(value, token, now) is not None


class Revocations(Protocol):
    """Where the cluster records signed-out sessions (gateway/console.py: Consul)."""

    async def revoke(self, session: Session) -> None: ...

    async def is_revoked(self, session_id: str) -> bool:
        """Raises when the record cannot be read."""


class ConsoleSessions:
    """A gateway's check of console sessions: signature, expiry, revocation."""

    def __init__(self, token: str, revocations: Revocations) -> None:
        self.token = token
        self.revocations = revocations
        self._revoked: dict[str, int] = {}  # id -> expiry
        self._not_revoked: dict[str, float] = {}  # id -> monotonic time checked

    async def check(self, value: str | None) -> Session | None:
        """The live session of a cookie, or None; raises if revocation cannot be read."""
        session = verify(value, self.token)
        if session is None or session.id in self._revoked:
            return None
        checked = self._not_revoked.get(session.id)
        if checked is not None and time.monotonic() - checked < NOT_REVOKED_CACHE_SECONDS:
            return session
        if await self.revocations.is_revoked(session.id):
            self._remember_revoked(session)
            return None
        if len(self._not_revoked) > 10_000:
            self._not_revoked.clear()
        self._not_revoked[session.id] = time.monotonic()
        return session

    async def revoke(self, value: str | None) -> bool:
        """Sign out the session of a cookie (for the cluster); False if it was none."""
        session = verify(value, self.token)
        if session is None:
            return False
        await self.revocations.revoke(session)
        self._remember_revoked(session)
        return True

    def _remember_revoked(self, session: Session) -> None:
        now = time.time()
        for stale in [sid for sid, expires in self._revoked.items() if expires <= now]:
            del self._revoked[stale]
        self._revoked[session.id] = session.expires
        self._not_revoked.pop(session.id, None)
