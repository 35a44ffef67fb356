"""The gateway's overload protection, built from its configuration.

Installed by `create_app` after the request-id, metrics and problem middlewares (so
a 429 or 503 carries the request id and is counted), and before every handler (so a
refused request never reads its body, touches the map or calls a booking service):

1. per-client booking rate limit: `POST /api/bookings` and `.../cancel` beyond
   `booking_rate_per_second` (burst `booking_burst`) per client address answer 429
   `rate-limited` with `Retry-After`;
2. load shedding: every `/api/` route but `/api/health` and `/api/ready` takes a slot
   of its class (`max_in_flight_reads`, `max_in_flight_bookings`), waiting at most
   `read_queue_ms` / `booking_queue_ms`; otherwise 503 `overloaded` with `Retry-After`.
   Reads are shed first (see `common.admission`);
3. the process's event-loop lag: while the loop runs timers later than `read_lag_ms`
   (reads) or `booking_lag_ms` (bookings) for a whole 100 ms window, new requests of
   that class answer 503 `overloaded` at once. On a CPU-bound machine this is what
   grows first: requests queue in the loop before any slot is taken.

The client is the connecting address. A gateway behind a load balancer would be
configured with that balancer as a trusted hop and take the address the balancer
appended to `X-Forwarded-For` (its last entry); the header as a client sends it is
never trusted, or any client could pick a fresh bucket for every request.

The public page (`GET /`, gateway/static/index.html) gets its own Content-Security-Policy
(`page_headers_middleware`): scripts and styles only as the page's own inline blocks, by
their SHA-256 hashes computed from the file at start (so an injected script, an inline
event handler attribute or another origin's script does not run), requests to this
origin only, no framing, no `<base>`, forms to this origin. Every other response gets
common/server.py's policy (nothing runs, nothing frames it) and its `X-Frame-Options:
DENY`, `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`; the console
sets its own (gateway/console.py `PAGE_HEADERS`). Test: tests/test_operator_sessions.py
(the headers), tests/test_web_page.py (the page still works under them, in Chromium).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from common.admission import (
    GATEWAY_DEFAULTS,
    Protection,
    ProtectionSettings,
    build_protection,
)

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

PROCESS = "gateway"
PAGE = Path(__file__).with_name("static") / "index.html"

__all__ = ["GATEWAY_DEFAULTS", "PROCESS", "ProtectionSettings", "gateway_protection"]


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                    for b in blocks) or "'none'"


def page_policy(html: str) -> str:
    """The public page's Content-Security-Policy, for this page text."""
    return (f"default-src 'none'; script-src {_hashes(html, 'script')}; "
            f"style-src {_hashes(html, 'style')}; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def page_headers_middleware(page: Path = PAGE) -> Middleware:
    policy = page_policy(page.read_text(encoding="utf-8"))

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.path == "/":
            response.headers["Content-Security-Policy"] = policy
            response.headers["Cache-Control"] = "no-cache"
        return response

    return middleware


def gateway_protection(settings: ProtectionSettings) -> Protection:
    """The rate-limit and shedding middlewares for these settings (none when all are off),
    the public page's headers, and the lag monitor they read: add `.lifecycle` to the
    app's `cleanup_ctx`."""
    protection = build_protection(settings, PROCESS)
    protection.middlewares.insert(0, page_headers_middleware())
    return protection
