"""Operator authentication: a bearer token from configuration. No token, no access.

- Every process takes the operator's token as `Authorization: Bearer <token>` only
  (compared in constant time). The console's browser session (common/operator_session.py)
  is accepted by `admin_auth_middleware` alone, on the console's own routes, with GET or
  HEAD, and only in a process that registered `CONSOLE_SESSIONS` (a gateway): booking
  services, node agents and controllers never accept it.
- A configured token must be strong (`token_weakness`): at least `MIN_TOKEN_LENGTH`
  printable ASCII characters without blanks, `MIN_DISTINCT_CHARACTERS` of them distinct.
  A process given a weaker one refuses to start (`configured_token`), saying why;
  `boxoffice up` generates 32 random URL-safe characters.
- In a process that authenticates its internal callers (common/internal_auth.py), a
  request signed by the operator (or by a failover controller, which acts for it) is an
  operator's request too: operator tools and controllers sign rather than send the token.
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING

from aiohttp import web

from common import operator_session
from common.internal_auth import request_caller
from common.operator_session import ConsoleSessions
from common.problems import Problem

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

ADMIN_TOKEN_ENV = "BOXOFFICE_ADMIN_TOKEN"
# The secret every gateway shares to authenticate consistency tokens (gateway/consistency.py).
TOKEN_SECRET_ENV = "BOXOFFICE_TOKEN_SECRET"


# Signed callers that act with the operator's authority (common/internal_auth.py).
OPERATOR_KINDS = frozenset({"operator", "controller"})
MIN_TOKEN_LENGTH = 32
MIN_DISTINCT_CHARACTERS = 10
# A gateway serving the console registers its session check here (gateway/console.py).
CONSOLE_SESSIONS = web.AppKey("console-sessions", ConsoleSessions)


def token_weakness(token: str) -> str | None:
    """Why `token` is too weak to be the operator token, or None."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"it has {len(token)} characters; at least {MIN_TOKEN_LENGTH} are needed"
    if not all("!" <= c <= "~" for c in token):
        return "it must be printable ASCII without blanks"
    if len(set(token)) < MIN_DISTINCT_CHARACTERS:
        return f"it repeats too few characters ({len(set(token))} distinct, {MIN_DISTINCT_CHARACTERS} needed)"
    return None


def configured_token() -> str | None:
    """The operator token from the environment (None: none configured). A process given
    a weak one exits with the reason (SystemExit)."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        return None
    weakness = token_weakness(token)
    if weakness is not None:
        raise SystemExit(f"{ADMIN_TOKEN_ENV} is too weak to protect the operator API: {weakness}. "
                         "Generate one, e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def require_operator(request: web.Request, token: str | None) -> None:
    """The bearer header with the operator token (or a request the operator or a controller
    signed, common/internal_auth.py), or a 401/403 problem."""
    caller = request_caller(request)
    if caller is not None and caller.kind in OPERATOR_KINDS:
        return
    if token is None:
        raise Problem(403, "admin-disabled", f"No operator token is configured ({ADMIN_TOKEN_ENV}).")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Problem(
            401, "unauthenticated", "Send the operator token as 'Authorization: Bearer <token>'.",
            headers={"WWW-Authenticate": 'Bearer realm="boxoffice-admin"'},
        )
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates; encoding them
    # back with surrogateescape compares the bytes the client sent (never an error).
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
        raise Problem(403, "forbidden", "That operator token is not valid.")


def operator_authenticated(request: web.Request, token: str | None) -> bool:
    """Does the request carry the valid operator token? (For optional detail, never raises.)"""
    try:
        require_operator(request, token)
    except Problem:
        return False
    return True


ADMIN_PATH_PREFIX = "/admin"


def is_admin_path(path: str) -> bool:
    """`/admin` and below; in a booking service also `/shards/<shard>/admin` and below."""
    if path.startswith("/shards/"):
        _, _, path = path[len("/shards/"):].partition("/")
        path = "/" + path
    return path == ADMIN_PATH_PREFIX or path.startswith(ADMIN_PATH_PREFIX + "/")


def admin_auth_middleware(token: str | None) -> Middleware:
    """Authenticate everything under `/admin` before routing: without the token a path
    answers 401 (403 with a wrong one) whether or not a route exists there, so the
    operator surface cannot be mapped by an anonymous client."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_admin_path(request.path) and not await _console_session(request):
            require_operator(request, token)
        return await handler(request)

    return middleware


async def _console_session(request: web.Request) -> bool:
    """Does a live console session open this request? (common/operator_session.py)"""
    sessions = request.app.get(CONSOLE_SESSIONS)
    viewing = (request.method in operator_session.SAFE_METHODS
               and request.path in operator_session.CONSOLE_PATHS)
    signing_out = request.method == "POST" and request.path == operator_session.LOGOUT_PATH
    if sessions is None or "Authorization" in request.headers or not (viewing or signing_out):
        return False
    cookie = request.cookies.get(operator_session.COOKIE_NAME)
    if cookie is None:
        return False
    try:
        return await sessions.check(cookie) is not None
    except Exception as exc:  # the revocation record unreadable: fail closed
        raise Problem(503, "session-unverifiable",
                      "Your console session cannot be checked now; retry, or use the bearer header.",
                      headers={"Retry-After": "2"}) from exc
