"""Run a regional gateway: `python -m gateway --region us-east --port 8081 --consul 127.0.0.1:8500`."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from pathlib import Path

import uvloop
from aiohttp import web

from common.auth import configured_token
from common.logs import setup_logging
from gateway.app import GatewayConfig, create_app
from gateway.routing import ClientRule
from region_map import BOOKING_SERVICE, ConsulMapStore, HealthWatcher, MapWatcher


def load_client_rules(path: str | None) -> list[ClientRule]:
    if not path:
        return []
    doc = json.loads(Path(path).read_text())
    return [
        ClientRule(ipaddress.ip_network(rule["prefix"]), rule["region"])
        for rule in doc.get("client_regions", [])
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--region", default=os.environ.get("BOXOFFICE_REGION", "local"))
    parser.add_argument("--host", default=os.environ.get("BOXOFFICE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("BOXOFFICE_PORT", "8080")))
    parser.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"))
    parser.add_argument("--map-prefix", default=os.environ.get("BOXOFFICE_MAP_PREFIX", "boxoffice/"))
    parser.add_argument("--client-regions", help="JSON file with client_regions rules")
    parser.add_argument("--rewrites", default="{}",
                        help="JSON {host:port: host:port}: the simulated inter-region network")
    parser.add_argument("--cache-ttl", type=float,
                        default=float(os.environ.get("BOXOFFICE_CACHE_TTL", "1.0")),
                        help="seconds a listing stays cached (default 1)")
    parser.add_argument("--write-retry-seconds", type=float,
                        default=float(os.environ.get("BOXOFFICE_WRITE_RETRY_SECONDS", "5.0")),
                        help="how long a write is retried (idempotently) while its shard's "
                             "primary does not answer, before a 503 (default 5)")
    parser.add_argument("--log-level", default=os.environ.get("BOXOFFICE_LOG_LEVEL", "INFO"))
    args = parser.parse_args()

    setup_logging(f"gateway[{args.region}]", args.log_level)
    host, _, port = args.consul.rpartition(":")
    store = ConsulMapStore(host=host or "127.0.0.1", port=int(port), prefix=args.map_prefix,
                           token=os.environ.get("CONSUL_HTTP_TOKEN") or None)
    watcher = MapWatcher(store)
    config = GatewayConfig(
        region=args.region,
        client_rules=load_client_rules(args.client_regions),
        address_rewrites=json.loads(args.rewrites),
        admin_token=configured_token(),
        cache_ttl_seconds=args.cache_ttl,
        write_retry_seconds=args.write_retry_seconds,
        cookie_domain=os.environ.get("BOXOFFICE_COOKIE_DOMAIN") or None,
        cookie_secure=os.environ.get("BOXOFFICE_COOKIE_SECURE", "") == "1",
    )
    health = HealthWatcher(store, BOOKING_SERVICE)
    app = create_app(config, store, watcher, health)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None,
                loop=uvloop.new_event_loop(), shutdown_timeout=5)


if __name__ == "__main__":
    main()
