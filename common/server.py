"""Running a process's web application: `serve()`, used by the gateway and the booking service.

What `aiohttp.web.run_app` does, plus:
- Errors aiohttp answers itself, before any middleware runs (a request or header
  line over 8 KB, a URL it cannot parse, bad chunked encoding, an invalid method),
  are RFC 9457 problem documents like every other error, never `text/plain`, and
  never carry the parser's text (which quotes the client's bytes back).
- An optional second listener serves only `GET /metrics`, so an internal address
  can carry metrics while the public one does not need to.
- `handler_cancellation`: a request whose client went away has its handler
  cancelled (the booking service stops work its caller abandoned).
- Slow and greedy clients (common/connections.py): a header and a body read timeout
  (408), an idle keep-alive timeout, a cap on connections per client address and in
  total (503 + `Retry-After`, closed at once), the descriptor limit raised at start.
- Every response carries `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`,
  `Referrer-Policy: no-referrer` and, unless its handler set one (the web page, the
  console), a `Content-Security-Policy` that allows nothing to run or frame it.
- SIGTERM and SIGINT stop the process gracefully: listeners close, requests in
  flight get `shutdown_timeout` seconds, then cleanup hooks run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Any, cast

import uvloop
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from common.connections import TIMED_OUT, ConnectionGate, ConnectionSettings, raise_fd_limit
from common.metrics import metrics_handler
from common.problems import PROBLEM_CONTENT_TYPE, Problem, problem_middleware

log = logging.getLogger("boxoffice.server")
LINGER_SECONDS = 1.0  # a refused connection reads and drops the client's bytes this long
MAX_LINGERING = 1024  # refused connections lingering at once; beyond, closed at once
CLEANUP_GRACE = 5.0  # seconds past the handlers' shutdown timeout before a hard exit


def protocol_problem(status: int, exc: BaseException | None) -> Problem:
    """The problem document for an error aiohttp's HTTP layer met (by its class, never its text)."""
    if status == 504:
        return Problem(504, "timeout", "The request took too long to answer.")
    if status >= 500:
        return Problem(500, "internal", "An unexpected error occurred.")
    if isinstance(exc, LineTooLong):
        return Problem(400, "line-too-long",
                       "A request line (method and URL) or a header line is longer than this "
                       "server reads (8190 bytes), or the headers are too large.")
    if isinstance(exc, InvalidURLError):
        return Problem(400, "invalid-url", "The request URL is not valid.")
    if isinstance(exc, BadHttpMethod):
        return Problem(400, "invalid-method", "The request method is not a valid HTTP method.")
    if isinstance(exc, PayloadEncodingError):  # chunked framing, Content-Length, coding
        return Problem(400, "unreadable-body",
                       "The request body's framing (chunked encoding or Content-Length) is broken.")
    if isinstance(exc, InvalidHeader):
        return Problem(400, "invalid-header", "A request header is not valid HTTP.")
    if isinstance(exc, BadStatusLine):
        return Problem(400, "invalid-request-line", "The request line is not valid HTTP.")
    return Problem(400, "bad-http-request",
                   "The request is not valid HTTP/1.1 (its request line, headers or body framing).")


def _raw_problem(status: int, reason: str, problem: Problem, headers: str = "") -> bytes:
    """A whole HTTP response written straight to a transport (no request to answer yet)."""
    body = json.dumps(problem.document()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {PROBLEM_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n")
    return head.encode() + body


REFUSED_RESPONSE = _raw_problem(
    503, "Service Unavailable",
    Problem(503, "too-many-connections",
            "This server holds as many connections from your address (or in all) as it "
            "accepts; close some and retry."),
    "Retry-After: 5\r\n")
HEADER_TIMEOUT_RESPONSE = _raw_problem(
    408, "Request Timeout",
    Problem(408, "request-timeout", "The request headers did not arrive in time."))


def _client_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "local"


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors with problem documents,
    and enforcing the connection limits of common/connections.py."""

    gate: ConnectionGate  # set by _ProblemServer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._address = _client_address(transport)
        self._counted = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._open_body: StreamReader | None = None
        self._partial_headers = False
        self._lingering: asyncio.TimerHandle | None = None
        refused = self.gate.admit(self._address)
        if refused is not None:
            log.info("connection refused", extra={"client": self._address, "reason": refused})
            transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
            transport.write(REFUSED_RESPONSE)
            if self.gate.lingering < MAX_LINGERING:
                # Closing with the client's request unread would reset the connection and
                # lose the answer: end our side (FIN after the 503), read and drop what it
                # sends, close when it does or after LINGER_SECONDS.
                self.gate.lingering += 1
                transport.write_eof()
                self._lingering = self._loop.call_later(LINGER_SECONDS, transport.close)
            else:
                transport.close()
            return
        self._counted = True
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:  # refused: aiohttp never saw it
            if self._lingering is not None:
                self._lingering.cancel()
                self._lingering = None
                self.gate.lingering -= 1
            return
        self._counted = False
        self.gate.release(self._address)
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return  # refused: being closed
        parsed_before = self._request_count
        super().data_received(data)
        new = self._request_count - parsed_before
        if new > 0:  # a request's headers are complete
            self._partial_headers = False
            self._cancel_header_timer()
            for _, payload in list(self._messages)[-new:]:
                if isinstance(payload, StreamReader) and not payload.is_eof():
                    self._arm_body_timer(payload)
        elif not self._receiving_body():
            self._partial_headers = bool(data)
            if self._header_timer is None:
                self._arm_header_timer()  # the first bytes of the next request

    # -- timers --------------------------------------------------------------------------
    def _receiving_body(self) -> bool:
        return self._open_body is not None and not self._open_body.is_eof()

    def _arm_header_timer(self) -> None:
        if self._force_close or self._close:
            return
        self._header_timer = self._loop.call_later(self.gate.settings.header_timeout,
                                                   self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_body_timer(self, payload: StreamReader) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._open_body = payload
        self._body_timer = self._loop.call_later(self.gate.settings.body_timeout, self._body_late, payload)
        payload.on_eof(self._body_done)

    def _body_done(self) -> None:
        if self._body_timer is not None and self._open_body is not None and self._open_body.is_eof():
            self._body_timer.cancel()
            self._body_timer = None
            self._open_body = None

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._open_body = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport is None or self._force_close:
            return
        TIMED_OUT.labels("header").inc()
        if self._request_in_progress or self._messages:
            self.close()  # a pipelined request's headers: close once the current one is done
            return
        if self._partial_headers:  # it sent part of a request: tell it why it ends
            self.transport.write(HEADER_TIMEOUT_RESPONSE)
        self.force_close()

    def _body_late(self, payload: StreamReader) -> None:
        self._body_timer = None
        if payload.is_eof():
            return
        TIMED_OUT.labels("body").inc()
        self._lingering_time = 0.0  # aiohttp would go on reading it after the answer
        payload.set_exception(Problem(408, "request-timeout", "The request body did not arrive in time."))
        self.close()  # after the handler answers

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling request", exc_info=exc)
        else:  # a client's malformed HTTP: worth a line, not a traceback
            log.info("malformed request refused",
                     extra={"status": status, "error": type(exc).__name__ if exc else None})
        if request.writer.output_size > 0:  # as aiohttp: nothing can be answered any more
            raise ConnectionError("a response was sent already; cannot send an error")
        problem = protocol_problem(status, exc)
        response = web.Response(status=problem.status, body=json.dumps(problem.document()).encode(),
                                content_type=PROBLEM_CONTENT_TYPE)
        response.force_close()  # the connection's framing cannot be trusted after this
        return response


class _ProblemServer(Server):
    """aiohttp's low-level server, making connections with `_ProblemRequestHandler`."""

    gate: ConnectionGate  # set by _ProblemAppRunner

    def __call__(self) -> RequestHandler:
        handler = _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.gate = self.gate
        return handler


class _ProblemAppRunner(web.AppRunner):
    def __init__(self, app: web.Application, gate: ConnectionGate, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=gate.settings.keepalive_timeout, **kwargs)
        self.gate = gate

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # The application built a plain Server (its handler, request factory and
        # settings); only the connection handler it makes differs, so adopt it.
        server.__class__ = _ProblemServer
        assert isinstance(server, _ProblemServer)
        server.gate = self.gate
        return server


def metrics_app() -> web.Application:
    """The internal listener's application: `GET /metrics` and nothing else, behind the
    scrape token when the process has one (common/internal_auth.py `METRICS_TOKEN_ENV`;
    `boxoffice up` gives every process one, and Prometheus sends it)."""
    from common.internal_auth import metrics_middleware

    app = web.Application(middlewares=[problem_middleware, metrics_middleware()])
    app.router.add_get("/metrics", metrics_handler)
    return app


# Sent on every response; a page that runs scripts sets its own policy (its handler's
# Content-Security-Policy header is kept), everything else may run and frame nothing.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
DEFAULT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


async def _security_headers(_: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Content-Security-Policy", DEFAULT_CSP)


_GATE: ConnectionGate | None = None


def process_gate() -> ConnectionGate:
    """The process's connection gate (one for all its listeners); the first call raises
    the descriptor limit and reads the settings from the environment."""
    global _GATE
    if _GATE is None:
        _GATE = ConnectionGate(ConnectionSettings.from_environment(raise_fd_limit()))
        log.info("connection limits", extra={"settings": vars(_GATE.settings)})
    return _GATE


def guarded_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """An `AppRunner` for `app` with this module's protections (connection limits and
    timeouts, problem documents for protocol errors, security headers): for a process
    that runs its own listeners instead of `serve()`."""
    if not app.frozen:
        app.on_response_prepare.append(_security_headers)
    kwargs.setdefault("access_log", None)
    return _ProblemAppRunner(app, process_gate(), **kwargs)


async def _serve(apps: list[tuple[web.Application, str, int]], handler_cancellation: bool,
                 shutdown_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for app, host, port in apps:
            runner = guarded_runner(app, handler_cancellation=handler_cancellation,
                                    shutdown_timeout=shutdown_timeout)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        try:  # a process asked to stop stops: cleanup is bounded, then it exits anyway
            async with asyncio.timeout(shutdown_timeout + CLEANUP_GRACE):
                for started in reversed(runners):
                    await started.cleanup()
        except TimeoutError:
            log.error("shutdown did not finish in time: exiting now")
            logging.shutdown()
            os._exit(1)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    metrics_host: str | None = None,
    metrics_port: int | None = None,
    handler_cancellation: bool = False,
    shutdown_timeout: float = 5.0,
) -> None:
    """Serve `app` on host:port (and `/metrics` on metrics_host:metrics_port when a
    port is given) on uvloop, until SIGTERM or SIGINT."""
    apps = [(app, host, port)]
    if metrics_port is not None:
        apps.append((metrics_app(), metrics_host or host, metrics_port))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(apps, handler_cancellation, shutdown_timeout))
