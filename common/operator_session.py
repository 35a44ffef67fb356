"""The operator's browser session: a cookie that proves the operator token was presented.

A browser cannot send `Authorization: Bearer` when it opens a page, so the operator
console (gateway/console.py) has a small sign-in form (`/operator/login`) that posts the
token once; a valid token gets this cookie back:

    boxoffice_operator=v1.<expiry, unix seconds>.<HMAC-SHA256 hex>

The MAC is keyed with the operator token itself over the version and the expiry, so
the gateway keeps no session state, every gateway of the cluster (one token) accepts
the cookie of any other, and changing the token ends every session at once. It is
compared in constant time. The cookie is `HttpOnly` (page scripts never see it),
`SameSite=Strict` (no cross-site request carries it), `Path=/admin` (it goes nowhere
else), `Secure` when the gateway serves HTTPS, and lasts `SESSION_SECONDS`.

It authenticates safe methods only (GET, HEAD: viewing); anything that changes the
cluster still needs the bearer header, so a session cannot be turned into an action
even by a request the browser would carry it on. Signing out clears the cookie in
that browser; a copied cookie stays valid until its expiry (or a token change).
"""

from __future__ import annotations

import hashlib
import hmac
import time

COOKIE_NAME = "boxoffice_operator"
COOKIE_PATH = "/admin"
SESSION_SECONDS = 8 * 3600  # one shift
SAFE_METHODS = frozenset({"GET", "HEAD"})
_VERSION = "v1"


def _mac(token: str, expires: int) -> str:
    message = f"boxoffice-operator-session {_VERSION} {expires}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def issue(token: str, now: float | None = None, lifetime: int = SESSION_SECONDS) -> str:
    """A session cookie value for the holder of `token`, valid for `lifetime` seconds."""
    expires = int(now if now is not None else time.time()) + lifetime
    return f"{_VERSION}.{expires}.{_mac(token, expires)}"


def valid(value: str | None, token: str | None, now: float | None = None) -> bool:
    """Is `value` a session cookie issued with `token` and not expired? Never raises."""
    if not value or not token:
        return False
    version, _, rest = value.partition(".")
    expires_text, _, mac = rest.partition(".")
    if version != _VERSION or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    if expires <= (now if now is not None else time.time()):
        return False
    given = mac.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, _mac(token, expires).encode())
