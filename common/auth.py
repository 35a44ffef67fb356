"""Operator authentication: a bearer token from configuration. No token, no access."""

from __future__ import annotations

import hmac
import os

from aiohttp import web

from common.problems import Problem

ADMIN_TOKEN_ENV = "BOXOFFICE_ADMIN_TOKEN"


def configured_token() -> str | None:
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    return token or None


def require_operator(request: web.Request, token: str | None) -> None:
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
