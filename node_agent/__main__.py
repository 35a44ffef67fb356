"""python -m node_agent --region R --port P --config FILE [--host H] [--metrics-port M]"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from aiohttp import web

from common import internal_auth
from common.auth import configured_token
from common.logs import setup_logging
from common.server import guarded_runner, metrics_app
from node_agent.api import make_app
from node_agent.config import AgentConfig
from node_agent.metrics import ReplicationProbe
from node_agent.supervisor import Supervisor
from region_map import ConsulMapStore, MapWatcher

log = logging.getLogger("boxoffice.node_agent")


async def serve(config: AgentConfig, host: str, port: int, metrics_port: int | None = None) -> None:
    store = ConsulMapStore(config.consul.host, config.consul.port, config.consul.prefix, config.consul.token)
    watcher = MapWatcher(store, max_backoff=1.0)
    supervisor = Supervisor(config, watcher)
    token = configured_token()
    verifier = internal_auth.Verifier.from_environment()  # else the operator token alone
    runner = guarded_runner(make_app(supervisor, token, verifier))
    probe = ReplicationProbe(supervisor)
    metrics_runner = guarded_runner(metrics_app())  # behind the scrape token
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await watcher.start(first_load_timeout=2.0)
        await supervisor.start()
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        await probe.start()
        if metrics_port is not None:  # /metrics on a listener of its own
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, host, metrics_port).start()
        log.info("node agent ready", extra={"region": config.region, "port": port,
                                             "copies": [c.name for c in config.copies]})
        await stopping.wait()
    finally:
        log.info("node agent stopping: stopping its servers")
        await metrics_runner.cleanup()
        await probe.stop()
        await runner.cleanup()
        await supervisor.stop()
        await watcher.stop()
        with contextlib.suppress(Exception):
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="node_agent", description=__doc__)
    parser.add_argument("--region", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--config", type=Path, required=True, help="JSON or YAML (see node_agent/config.py)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve /metrics (node_agent/metrics.py) on this port")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    setup_logging(f"node_agent-{args.region}", args.log_level)
    config = AgentConfig.load(args.config, args.region)
    asyncio.run(serve(config, args.host, args.port, args.metrics_port))


if __name__ == "__main__":
    main()
