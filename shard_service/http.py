"""Small response and deadline helpers every handler module of the booking service uses."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from common.deadlines import DEADLINE_HEADER, Deadline

JSON = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type=JSON, headers=headers
    )


def raw_json(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON document the database wrote (sent as it is)."""
    return web.Response(status=status, body=text.encode(), content_type=JSON, headers=headers)


def request_deadline(request: web.Request) -> Deadline:
    """How long the caller waits for this request (its deadline header, else a default)."""
    return Deadline.from_header(request.headers.get(DEADLINE_HEADER))
