"""Installing a shard's schema and booking functions into a primary."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

import asyncpg

from shard_service import queries

SQL_DIR = Path(__file__).parent / "sql"
REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_FILE = REPO_ROOT / "seed.sql"
SAMPLE_DATA_MARKER = "-- == sample data =="


def seed_sql(with_sample_data: bool) -> str:
    text = SEED_FILE.read_text()
    if not with_sample_data:
        text = text.split(SAMPLE_DATA_MARKER, 1)[0]
    return text


async def install(dsn: str, *, with_sample_data: bool) -> None:
    """Create the tables (seed.sql) and (re)create the booking functions."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('boxoffice-schema'))")
            await conn.execute(seed_sql(with_sample_data))
            await conn.execute((SQL_DIR / "booking.sql").read_text())
    finally:
        await conn.close()


async def keep_only_events(dsn: str, event_ids: Iterable[uuid.UUID | str]) -> int:
    """Delete every event (and its tiers) not in `event_ids`; returns how many went."""
    conn = await asyncpg.connect(dsn)
    try:
        result = await conn.execute(
            queries.DELETE_EVENTS_EXCEPT, [uuid.UUID(str(e)) for e in event_ids]
        )
        return int(result.split()[-1])
    finally:
        await conn.close()


async def event_ids(dsn: str) -> list[str]:
    """The ids of the events this database holds, in start order."""
    conn = await asyncpg.connect(dsn)
    try:
        return [str(r[0]) for r in await conn.fetch(queries.EVENT_IDS)]
    finally:
        await conn.close()
