"""python -m failover --region R --consul HOST:PORT [--port P] [--grace-ms 400] [--lock-ttl 1]

The automatic failover controller of one region (failover/controller.py): run one per
region; exactly one of them is active at a time. It calls the node agents and booking
services with requests signed as a `controller` (common/internal_auth.py: its key from
`BOXOFFICE_INTERNAL_KEY`; without one, as the operator, with the key derived from
`BOXOFFICE_ADMIN_TOKEN`: one of the two is required). With `--port` it serves, on that
(internal) listener, `GET /status` (JSON:
active or standby, the lock's holder, the settings, suspected primaries, the last
failover with its detection, decision and promotion times), for a gateway's or the
operator's signed request (or the operator token), and `GET /metrics` (the scrape token,
`BOXOFFICE_METRICS_TOKEN`, when one is set) (Prometheus: `boxoffice_controller_active`,
`boxoffice_failovers_total`, `boxoffice_failover_seconds`). Every flag has a
`BOXOFFICE_CONTROLLER_*` environment default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from aiohttp import web

from common import internal_auth
from common.auth import configured_token
from common.logs import setup_logging
from common.metrics import metrics_handler
from common.problems import problem_middleware
from common.server import guarded_runner
from failover.controller import Controller, FaultHook, Settings, exit_after
from region_map import ConsulMapStore

log = logging.getLogger("boxoffice.failover.controller")

FAULT_ENV = "BOXOFFICE_CONTROLLER_FAULT"  # tests only: "exit-after:<promote step>"
STATUS = web.AppKey("controller", Controller)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"BOXOFFICE_CONTROLLER_{name}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region", default=os.environ.get("BOXOFFICE_REGION", "local"))
    parser.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"))
    parser.add_argument("--map-prefix", default=os.environ.get("BOXOFFICE_MAP_PREFIX", "boxoffice/"))
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="status listener address")
    parser.add_argument("--port", type=int, default=int(_env("PORT", "0")) or None,
                        help="status and metrics listener port (none: not served)")
    parser.add_argument("--grace-ms", type=float, default=float(_env("GRACE_MS", "400")),
                        help="how long a primary must stay down past detection before it is "
                             "failed over (default 400)")
    parser.add_argument("--lock-ttl", type=float, default=float(_env("LOCK_TTL", "1.0")),
                        help="the controller lock's session TTL in seconds (default 1; Consul's "
                             "session_ttl_min must allow it)")
    parser.add_argument("--probe-timeout-ms", type=float, default=float(_env("PROBE_TIMEOUT_MS", "1000")),
                        help="one probe of a node agent (default 1000)")
    parser.add_argument("--standby-signal", choices=("on", "off"), default=_env("STANDBY_SIGNAL", "on"),
                        help="also detect a lost primary by its standbys' view (a ping of every "
                             "primary's agent each 0.1 s; failover/controller.py) (default on)")
    parser.add_argument("--log-level", default=os.environ.get("BOXOFFICE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    if args.grace_ms < 0 or args.lock_ttl <= 0 or args.probe_timeout_ms <= 0:
        parser.error("--grace-ms must be >= 0, --lock-ttl and --probe-timeout-ms > 0")
    return args


def fault_hook() -> FaultHook | None:
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, step = spec.partition(":")
    if not spec:
        return None
    if kind != "exit-after" or not step:
        raise SystemExit(f"{FAULT_ENV} must be exit-after:<step>, not {spec!r}")
    return exit_after(step)


STATUS_CALLERS = frozenset({"gateway", "operator"})


def status_policy(_: str, path: str) -> frozenset[str] | None:
    """`/metrics` has its scrape token; everything else is for gateways and the operator."""
    return None if path == "/metrics" else STATUS_CALLERS


def status_app(controller: Controller, token: str | None) -> web.Application:
    """The status listener's application, its callers authenticated before routing (by
    the keys the process was given, else the operator's derived from its token)."""
    verifier = (internal_auth.Verifier.from_environment()
                or internal_auth.Verifier({"operator": internal_auth.operator_key(token)} if token else {}))
    app = web.Application(middlewares=[
        problem_middleware, internal_auth.metrics_middleware(path="/metrics"),
        internal_auth.middleware(verifier, status_policy)])
    app[STATUS] = controller
    app.router.add_get("/status", status_handler)
    app.router.add_get("/metrics", metrics_handler)
    return app


def own_signer() -> internal_auth.Signer | None:
    """The controller's own credential (`BOXOFFICE_INTERNAL_KIND=controller` and its key)."""
    signer = internal_auth.Signer.from_environment()
    return signer if signer is not None and signer.kind == "controller" else None


def sign_as_controller(controller: Controller) -> None:
    """The controller's calls sign with its own key when it has one (else, as built, with
    the operator's key derived from the token)."""
    signer = own_signer()
    if signer is None:
        return
    controller.probes.signer = signer
    controller.agents.signer = signer
    controller.shard_admin.signer = signer


async def status_handler(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATUS].status())


async def serve(args: argparse.Namespace, token: str | None) -> None:
    host, _, port = args.consul.rpartition(":")
    store = ConsulMapStore(host=host or "127.0.0.1", port=int(port), prefix=args.map_prefix,
                           token=os.environ.get("CONSUL_HTTP_TOKEN") or None)
    status_url = f"http://{args.host}:{args.port}/status" if args.port else ""
    settings = Settings(region=args.region, grace=args.grace_ms / 1000, lock_ttl=args.lock_ttl,
                        probe_timeout=args.probe_timeout_ms / 1000, status_url=status_url,
                        standby_signal=args.standby_signal == "on")
    # Without the token (it has its own key) the clients' operator signer is a placeholder
    # that sign_as_controller replaces at once.
    controller = Controller(store, token or "", settings, fault_hook=fault_hook())
    sign_as_controller(controller)
    runner: web.AppRunner | None = None
    if args.port:
        runner = guarded_runner(status_app(controller, token))
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("failover controller starting", extra={"region": args.region, "graceMs": args.grace_ms,
                                                     "lockTtl": args.lock_ttl, "status": status_url})
    task = asyncio.create_task(controller.run(), name="controller")
    try:
        await asyncio.wait([task, asyncio.create_task(stopping.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # a term ends: its session is destroyed, the lock freed at once
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(Exception):
            await store.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(f"controller-{args.region}", args.log_level)
    token = configured_token()
    if token is None and own_signer() is None:
        sys.exit("BOXOFFICE_INTERNAL_KEY (a controller's, with BOXOFFICE_INTERNAL_KIND=controller) or "
                 "BOXOFFICE_ADMIN_TOKEN must be set: the controller calls the node agents' operator API")
    asyncio.run(serve(args, token))


if __name__ == "__main__":
    main()
