"""The inventory invariants, read straight from every shard primary's database
(`shard_service.inventory.audit_inventory`, where the SQL lives).

For every tier of every event: sold + remaining = capacity, where sold is the sum of
the quantities of its confirmed bookings' items; remaining is never negative; and no
client reference names more than one booking (MISSION.md §3: a reference is unique
within its shard, so in particular per event).

Kept free of locust, and so of gevent's monkeypatching: the runner calls it in a
process of its own, and it prints one JSON document:

    .venv/bin/python -m loadtest.invariants --primary shard-1=postgresql://... \\
        [--reference-prefix lt-abc-] [--tier TIER_ID]
    .venv/bin/python -m loadtest.invariants --state-dir /tmp/boxoffice-$UID

`--reference-prefix` also lists the bookings whose reference starts with it (id ->
status), so the runner can check that every booking a client was told about exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg

from shard_service.inventory import audit_inventory


async def check_shard(dsn: str, reference_prefix: str | None, tier_ids: list[str]) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        audit = await audit_inventory(conn, reference_prefix=reference_prefix)
    finally:
        await conn.close()
    return {
        "tiers": len(audit.tiers),
        "violations": [asdict(t) for t in audit.violations],
        "duplicateReferences": audit.duplicate_references,
        "runBookings": audit.bookings,
        "tierDetails": {t.tier_id: asdict(t) for t in audit.tiers if t.tier_id in tier_ids},
    }


async def check_all(
    primaries: dict[str, str], reference_prefix: str | None = None, tier_ids: list[str] | None = None
) -> dict[str, Any]:
    """Check every shard; `held` is true when no invariant failed on any of them."""
    names = list(primaries)
    results = await asyncio.gather(
        *(check_shard(primaries[n], reference_prefix, tier_ids or []) for n in names)
    )
    shards = dict(zip(names, results, strict=True))
    held = all(not s["violations"] and not s["duplicateReferences"] for s in shards.values())
    return {"held": held, "shards": shards}


def parse_primary(raw: str, index: int) -> tuple[str, str]:
    """`NAME=DSN`, or a bare `postgresql://` DSN (named by its position)."""
    if raw.startswith(("postgresql://", "postgres://")):
        return f"primary-{index}", raw
    name, sep, dsn = raw.partition("=")
    if not sep or not dsn:
        raise argparse.ArgumentTypeError(f"expected NAME=DSN or a postgresql:// DSN, got {raw!r}")
    return name, dsn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.invariants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--primary", action="append", default=[], metavar="NAME=DSN",
                        help="a shard primary's database (repeatable)")
    parser.add_argument("--state-dir", type=Path, help="read the primaries from DIR/cluster.json")
    parser.add_argument("--reference-prefix", help="also list bookings whose reference starts with this")
    parser.add_argument("--tier", action="append", default=[], help="also report this tier in detail")
    args = parser.parse_args(argv)
    primaries = dict(parse_primary(raw, n) for n, raw in enumerate(args.primary, 1))
    if args.state_dir:
        primaries.update(json.loads((args.state_dir / "cluster.json").read_text())["primaries"])
    if not primaries:
        parser.error("no database: give --primary NAME=DSN or --state-dir")
    result = asyncio.run(check_all(primaries, args.reference_prefix, args.tier))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
