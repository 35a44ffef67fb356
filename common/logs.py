"""Structured (JSON-lines) logs with a request id that crosses process hops."""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id")  # the id on the request
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "proc": self.process_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            line["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "request_id":
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(process_name: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# A random prefix per process and a counter: unique across processes and restarts
# in practice, and cheap (no system call per request, as uuid4 would make).
_ID_PREFIX = uuid.uuid4().hex[:12]
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


_access = logging.getLogger("boxoffice.access")
# A caller's request id is kept only in this plain ASCII form (it is echoed in a header
# and written into every log line).
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Take the caller's request id (or make one), log the request, echo the id."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    rid = incoming if _REQUEST_ID.match(incoming) else new_request_id()
    request[REQUEST_ID_KEY] = rid
    token = request_id_var.set(rid)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers[REQUEST_ID_HEADER] = rid
        return response
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        # A 503 is an answer this process chose (shedding, a dependency down: both
        # counted in metrics); logging each one would cost most when it is overloaded.
        level = logging.WARNING if status >= 500 and status != 503 else logging.DEBUG
        if _access.isEnabledFor(level):
            _access.log(
                level,
                "request",
                extra={"method": request.method, "path": request.path, "status": status,
                       "ms": round(elapsed_ms, 2)},
            )
        request_id_var.reset(token)
