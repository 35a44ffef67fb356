"""RFC 9457 problem documents, and the middleware that makes every error one.

Handlers raise `Problem`; aiohttp's own HTTP errors (404 for an unknown path,
405, 413 for an oversized body) and anything unexpected are turned into
problem documents too, so no client ever sees an HTML error page or a bare 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from common.logs import REQUEST_ID_KEY

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "https://boxoffice.example/problems/"

log = logging.getLogger("boxoffice.problems")

TITLES = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Problem(Exception):
    """An error answer: status, a stable machine-readable type, a human detail."""

    def __init__(
        self,
        status: int,
        type_: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type_
        self.title = title or TITLES.get(status, "Error")
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": TYPE_BASE + self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        doc.update(self.extra)
        return doc

    def response(self, request_id: str | None = None) -> web.Response:
        doc = self.document()
        if request_id:
            doc["requestId"] = request_id
        return web.Response(
            status=self.status,
            body=json.dumps(doc).encode(),
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers,
        )


def _from_http_exception(exc: web.HTTPException) -> Problem:
    status = exc.status
    if status == 413:
        return Problem(413, "body-too-large", "The request body is larger than this API accepts.")
    if status == 404:
        return Problem(404, "not-found", "No such resource.")
    if isinstance(exc, web.HTTPMethodNotAllowed):  # Allow is required with a 405 (RFC 9110)
        return Problem(
            405, "method-not-allowed", f"This resource does not support {exc.method}.",
            headers={"Allow": exc.headers.get("Allow", "")},
        )
    return Problem(status, "http-error", exc.reason or TITLES.get(status, "Error"))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.get(REQUEST_ID_KEY)
    try:
        return await handler(request)
    except Problem as problem:
        return problem.response(request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(exc).response(request_id)
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id, "path": request.path})
        return Problem(500, "internal", "An unexpected error occurred.").response(request_id)
