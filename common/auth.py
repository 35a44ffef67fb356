"""Operator authentication: a bearer token from configuration. No token, no access."""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING

from aiohttp import web

from common import operator_session
from common.problems import Problem

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

ADMIN_TOKEN_ENV = "BOXOFFICE_ADMIN_TOKEN"
# The secret every gateway shares to authenticate consistency tokens (gateway/consistency.py).
TOKEN_SECRET_ENV = "BOXOFFICE_TOKEN_SECRET"


def configured_token() -> str | None:
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    return token or None


def require_operator(request: web.Request, token: str | None) -> None:
    if token is None:
        raise Problem(403, "admin-disabled", f"No operator token is configured ({ADMIN_TOKEN_ENV}).")
    header = request.headers.get("Authorization", "")
    if not header and request.method in operator_session.SAFE_METHODS and operator_session.valid(
            request.cookies.get(operator_session.COOKIE_NAME), token):
        return  # the console's browser session (common/operator_session.py): viewing only
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
        if is_admin_path(request.path):
            require_operator(request, token)
        return await handler(request)

    return middleware
