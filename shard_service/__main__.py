"""Run a booking service: `python -m shard_service --region R --port P --consul HOST:PORT --shard ...`.

`--shard` (repeatable): `name=shard-1,dsn=postgresql://...,member=us-east[,pool=20]`:
the shard, its copy's database, and the copy's key in the shard record's
members (`us-east` for a region's first zone, `us-east/b` for its second). The
copy's role (primary, replica, fenced, unknown) comes from the region map in
Consul (`--consul`, `--map-prefix`; CONSUL_HTTP_TOKEN) and from the database,
at run time: shard_service/roles.py. With no `--shard`, one shard comes from
the environment (BOXOFFICE_SHARD_NAME, BOXOFFICE_SHARD_DSN,
BOXOFFICE_SHARD_MEMBER, default: the region).

Bookings are committed in batches per shard (shard_service/combiner.py):
`--batching on|off` (BOXOFFICE_BATCHING, default on), `--batch-max N`
(BOXOFFICE_BATCH_MAX, requests per batch at most, default 64) and
`--batch-concurrency N` (BOXOFFICE_BATCH_CONCURRENCY, batches in flight per
shard, default 1). Off: one CALL (one transaction) per booking, as before
issue 9 (kept for comparison: loadtest/flash_sale_batching.py, benchmarks/hot_tier.py).
"""

from __future__ import annotations

import argparse
import os

from common.admission import SERVICE_DEFAULTS, add_protection_arguments, protection_from_args
from common.internal_auth import NoKeys
from common.logs import setup_logging
from common.server import serve
from region_map import ConsulMapStore
from shard_service.app import ShardConfig, create_app
from shard_service.combiner import DEFAULT_MAX_SIZE, BatchSettings

SHARD_FIELDS = frozenset({"name", "dsn", "member", "pool"})


def parse_shard(spec: str) -> ShardConfig:
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    unknown = set(fields) - SHARD_FIELDS
    if unknown:  # e.g. the retired role= and home=: a role is never a start flag
        raise argparse.ArgumentTypeError(
            f"--shard does not take {', '.join(sorted(unknown))} (fields: name, dsn, member, pool)")
    try:
        return ShardConfig(
            name=fields["name"],
            dsn=fields["dsn"],
            member=fields["member"],
            pool_size=int(fields.get("pool", "20")),
        )
    except KeyError as exc:
        raise argparse.ArgumentTypeError(f"--shard needs {exc.args[0]}=") from None
    except ValueError:
        raise argparse.ArgumentTypeError("--shard pool= is not a number") from None


def parse_consul(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--consul {address!r} is not host:port") from None


def parse_switch(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not on or off")


def positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is below 1")
    return n


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
    parser.add_argument("--consul", type=parse_consul,
                        default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"),
                        help="Consul agent host:port, where the region map is (default "
                             "$CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    parser.add_argument("--map-prefix", default=os.environ.get("BOXOFFICE_MAP_PREFIX", "boxoffice/"),
                        help="KV prefix of the region map (default $BOXOFFICE_MAP_PREFIX or boxoffice/)")
    parser.add_argument("--shard", action="append", type=parse_shard, default=[])
    parser.add_argument("--log-level", default=os.environ.get("BOXOFFICE_LOG_LEVEL", "INFO"))
    parser.add_argument("--batching", type=parse_switch,
                        default=os.environ.get("BOXOFFICE_BATCHING", "on"),
                        help="commit bookings in batches per shard: on|off (default "
                             "$BOXOFFICE_BATCHING or on)")
    parser.add_argument("--batch-max", type=positive,
                        default=os.environ.get("BOXOFFICE_BATCH_MAX", str(DEFAULT_MAX_SIZE)),
                        help=f"booking requests per batch at most (default $BOXOFFICE_BATCH_MAX "
                             f"or {DEFAULT_MAX_SIZE})")
    parser.add_argument("--batch-concurrency", type=positive,
                        default=os.environ.get("BOXOFFICE_BATCH_CONCURRENCY", "1"),
                        help="batches in flight per shard (default $BOXOFFICE_BATCH_CONCURRENCY or 1)")
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
                member=os.environ.get("BOXOFFICE_SHARD_MEMBER", args.region),
            )
        ]
    setup_logging(f"shard_service[{args.region}]", args.log_level)
    consul_host, consul_port = args.consul  # argparse parses a string default too
    store = ConsulMapStore(host=consul_host, port=consul_port, prefix=args.map_prefix,
                           token=os.environ.get("CONSUL_HTTP_TOKEN") or None)
    try:
        app = create_app(shards, args.region, store,
                         protection=protection_from_args(args, SERVICE_DEFAULTS),
                         batching=BatchSettings(args.batching, args.batch_max, args.batch_concurrency))
    except NoKeys as exc:
        parser.exit(2, f"error: {exc}\n")
    # handler_cancellation: a request whose caller hung up (a gateway that gave up on
    # it) is cancelled, and with it its statement: no work for an abandoned caller.
    serve(app, host=args.host, port=args.port, metrics_host=args.metrics_host,
          metrics_port=args.metrics_port, handler_cancellation=True)


if __name__ == "__main__":
    main()
