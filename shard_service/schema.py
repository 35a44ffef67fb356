"""Installing a shard's schema and booking functions into a primary."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from importlib import resources

import asyncpg

from shard_service import queries

SAMPLE_DATA_MARKER = "-- == sample data =="


def sql_file(name: str) -> str:
    """The text of `shard_service/sql/<name>`, read as package data (so a non-editable
    install works: nothing is looked up beside the source tree)."""
    return resources.files("shard_service").joinpath("sql", name).read_text(encoding="utf-8")


def seed_sql(with_sample_data: bool) -> str:
    """The schema of sql/seed.sql, with or without its sample concerts."""
    text = sql_file("seed.sql")
    if not with_sample_data:
        text = text.split(SAMPLE_DATA_MARKER, 1)[0]
    return text


FIRST_EPOCH = 1  # a new cluster's map starts its shards at epoch 1


async def install(dsn: str, *, with_sample_data: bool, epoch: int = FIRST_EPOCH) -> None:
    """Create the tables (sql/seed.sql), (re)create the booking functions, and write the
    epoch row if there is none yet (`epoch`: the shard's epoch in the map; an existing
    row is kept, whatever it says: only a promotion moves it)."""
    if epoch < 0:
        raise ValueError("an epoch is never negative")
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('boxoffice-schema'))")
            await conn.execute(seed_sql(with_sample_data))
            await conn.execute(sql_file("moves.sql"))
            await conn.execute(sql_file("booking.sql"))
            await conn.execute(sql_file("events.sql"))
            await conn.execute(queries.INSERT_FIRST_EPOCH, epoch)
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
