"""Run a regional gateway: `python -m gateway --region us-east --port 8081 --consul 127.0.0.1:8500`."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import secrets
from pathlib import Path

from common.admission import add_protection_arguments, protection_from_args
from common.auth import TOKEN_SECRET_ENV, configured_token
from common.logs import setup_logging
from common.server import serve
from gateway.app import GatewayConfig, create_app
from gateway.protection import GATEWAY_DEFAULTS
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


def token_secret() -> bytes:
    """The consistency-token secret every gateway shares (BOXOFFICE_TOKEN_SECRET). Without
    one, a random secret of this process: its tokens are good here only (logged)."""
    configured = os.environ.get(TOKEN_SECRET_ENV, "")
    if configured:
        return configured.encode()
    logging.getLogger("boxoffice.gateway").warning(
        f"{TOKEN_SECRET_ENV} is not set: consistency tokens work with this gateway only")
    return secrets.token_bytes(32)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--region", default=os.environ.get("BOXOFFICE_REGION", "local"))
    parser.add_argument("--host", default=os.environ.get("BOXOFFICE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("BOXOFFICE_PORT", "8080")))
    parser.add_argument("--metrics-host", help="address of the /metrics listener (default: --host)")
    parser.add_argument("--metrics-port", type=int,
                        default=int(os.environ["BOXOFFICE_METRICS_PORT"])
                        if os.environ.get("BOXOFFICE_METRICS_PORT") else None,
                        help="port of a separate /metrics listener (default: none)")
    parser.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"))
    parser.add_argument("--map-prefix", default=os.environ.get("BOXOFFICE_MAP_PREFIX", "boxoffice/"))
    parser.add_argument("--client-regions", help="JSON file with client_regions rules")
    parser.add_argument("--rewrites", default="{}",
                        help="JSON {host:port: host:port}: the simulated inter-region network")
    parser.add_argument("--cache-ttl", type=float,
                        default=float(os.environ.get("BOXOFFICE_CACHE_TTL", "1.0")),
                        help="seconds a listing stays cached (default 1)")
    parser.add_argument("--write-retry-seconds", type=float,
                        default=float(os.environ.get("BOXOFFICE_WRITE_RETRY_SECONDS", "10.0")),
                        help="how long a write is retried (idempotently) while its shard's "
                             "primary does not answer, before a 503 (default 10)")
    parser.add_argument("--write-attempt-seconds", type=float,
                        default=float(os.environ.get("BOXOFFICE_WRITE_ATTEMPT_SECONDS", "2.0")),
                        help="timeout of one write attempt; the booking service gets a "
                             "slightly shorter deadline (default 2)")
    parser.add_argument("--log-level", default=os.environ.get("BOXOFFICE_LOG_LEVEL", "INFO"))
    add_protection_arguments(parser, GATEWAY_DEFAULTS)
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
        write_attempt_seconds=args.write_attempt_seconds,
        token_secret=token_secret(),
        cookie_domain=os.environ.get("BOXOFFICE_COOKIE_DOMAIN") or None,
        cookie_secure=os.environ.get("BOXOFFICE_COOKIE_SECURE", "") == "1",
        protection=protection_from_args(args, GATEWAY_DEFAULTS),
    )
    health = HealthWatcher(store, BOOKING_SERVICE)
    app = create_app(config, store, watcher, health)
    serve(app, host=args.host, port=args.port, metrics_host=args.metrics_host,
          metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()
