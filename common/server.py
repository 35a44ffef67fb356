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
- SIGTERM and SIGINT stop the process gracefully: listeners close, requests in
  flight get `shutdown_timeout` seconds, then cleanup hooks run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal

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
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from common.metrics import metrics_handler
from common.problems import PROBLEM_CONTENT_TYPE, Problem, problem_middleware

log = logging.getLogger("boxoffice.server")
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


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors with problem documents."""

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

    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class _ProblemAppRunner(web.AppRunner):
    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # The application built a plain Server (its handler, request factory and
        # settings); only the connection handler it makes differs, so adopt it.
        server.__class__ = _ProblemServer
        return server


def metrics_app() -> web.Application:
    """The internal listener's application: `GET /metrics` and nothing else."""
    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/metrics", metrics_handler)
    return app


async def _serve(apps: list[tuple[web.Application, str, int]], handler_cancellation: bool,
                 shutdown_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for app, host, port in apps:
            runner = _ProblemAppRunner(app, access_log=None, handler_cancellation=handler_cancellation,
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
