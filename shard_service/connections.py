"""The database connections the booking service's code is written against.

Handlers run on connections borrowed from the shard's pool (asyncpg hands out a proxy
that forwards to the connection); the role tracker, tools and tests use plain ones.
Code that takes either is typed `Connection`.
"""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Connection: TypeAlias = "asyncpg.Connection | PoolConnectionProxy"


async def fetch_one(conn: Connection, query: str, *args: object,
                    timeout: float | None = None) -> asyncpg.Record:
    """The row of a statement that always answers exactly one: a CALL of a procedure
    with OUT parameters, a SELECT without FROM, an aggregate. No row means the schema
    is not the one this code was written for: an error, never a value."""
    row = await conn.fetchrow(query, *args, timeout=timeout)
    if row is None:
        raise RuntimeError(f"no row from a statement that always answers one: {query.strip()[:60]}")
    return row
