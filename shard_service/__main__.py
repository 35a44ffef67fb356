"""Run a booking service: `python -m shard_service --region R --port P --shard ...`.

`--shard` (repeatable): `name=shard-1,dsn=postgresql://...,role=primary,home=us-east`.
With no `--shard`, one shard comes from the environment
(BOXOFFICE_SHARD_NAME, BOXOFFICE_SHARD_DSN, BOXOFFICE_SHARD_ROLE, BOXOFFICE_REGION).
"""

from __future__ import annotations

import argparse
import os

from common.admission import SERVICE_DEFAULTS, add_protection_arguments, protection_from_args
from common.logs import setup_logging
from common.server import serve
from shard_service.app import ShardConfig, create_app


def parse_shard(spec: str) -> ShardConfig:
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    try:
        return ShardConfig(
            name=fields["name"],
            dsn=fields["dsn"],
            role=fields.get("role", "primary"),
            home_region=fields.get("home", os.environ.get("BOXOFFICE_REGION", "local")),
            pool_size=int(fields.get("pool", "20")),
        )
    except KeyError as exc:
        raise argparse.ArgumentTypeError(f"--shard needs {exc.args[0]}=") from None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m shard_service", description=__doc__)
    parser.add_argument("--region", default=os.environ.get("BOXOFFICE_REGION", "local"))
    parser.add_argument("--host", default=os.environ.get("BOXOFFICE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("BOXOFFICE_PORT", "7001")))
    parser.add_argument("--metrics-host", help="address of the /metrics listener (default: --host)")
    parser.add_argument("--metrics-port", type=int,
                        default=int(os.environ["BOXOFFICE_METRICS_PORT"])
                        if os.environ.get("BOXOFFICE_METRICS_PORT") else None,
                        help="port of a separate /metrics listener (default: none)")
    parser.add_argument("--shard", action="append", type=parse_shard, default=[])
    parser.add_argument("--log-level", default=os.environ.get("BOXOFFICE_LOG_LEVEL", "INFO"))
    add_protection_arguments(parser, SERVICE_DEFAULTS, rate_limits=False)
    args = parser.parse_args()
    shards: list[ShardConfig] = args.shard
    if not shards:
        shards = [
            ShardConfig(
                name=os.environ.get("BOXOFFICE_SHARD_NAME", "shard-1"),
                dsn=os.environ.get(
                    "BOXOFFICE_SHARD_DSN", "postgresql://postgres@127.0.0.1:5432/boxoffice"
                ),
                role=os.environ.get("BOXOFFICE_SHARD_ROLE", "primary"),
                home_region=args.region,
            )
        ]
    setup_logging(f"shard_service[{args.region}]", args.log_level)
    app = create_app(shards, args.region,
                     protection=protection_from_args(args, SERVICE_DEFAULTS))
    # handler_cancellation: a request whose caller hung up (a gateway that gave up on
    # it) is cancelled, and with it its statement: no work for an abandoned caller.
    serve(app, host=args.host, port=args.port, metrics_host=args.metrics_host,
          metrics_port=args.metrics_port, handler_cancellation=True)


if __name__ == "__main__":
    main()
