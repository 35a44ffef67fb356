"""The epoch row in a shard database: written first by every promotion, never lowered.

`write_epoch` is idempotent: writing the stored epoch again is a success that changes
nothing; a lower epoch is refused (`EpochLower`), so a late or replayed promotion of an
older epoch can never undo a newer one. The check and the write are one statement
(`... WHERE epoch < $1`), so two writers cannot interleave between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import asyncpg

CONNECT_TIMEOUT = 3.0

EPOCH_DDL = resources.files("node_agent").joinpath("sql/epoch.sql").read_text()

WRITE_EPOCH = """
INSERT INTO boxoffice_epoch AS e (id, epoch, primary_name, since_lsn, updated_at)
VALUES (true, $1, $2, pg_current_wal_insert_lsn(), now())
ON CONFLICT (id) DO UPDATE
    SET epoch = EXCLUDED.epoch, primary_name = EXCLUDED.primary_name,
        since_lsn = EXCLUDED.since_lsn, updated_at = EXCLUDED.updated_at
    WHERE e.epoch < EXCLUDED.epoch
RETURNING epoch
"""

READ_EPOCH = "SELECT epoch FROM boxoffice_epoch"


class EpochLower(Exception):
    """The database already holds a higher epoch."""

    def __init__(self, stored: int, asked: int) -> None:
        super().__init__(f"stored epoch {stored} is higher than {asked}")
        self.stored = stored
        self.asked = asked


class NotPrimary(Exception):
    """The database is in recovery (a standby): it takes no writes."""


@dataclass(frozen=True)
class EpochWrite:
    epoch: int
    changed: bool  # False: it already held this epoch


async def write_epoch(dsn: str, epoch: int, primary_name: str) -> EpochWrite:
    if epoch < 0:
        raise ValueError("an epoch is never negative")
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        if await conn.fetchval("SELECT pg_is_in_recovery()"):
            raise NotPrimary("a standby takes no writes")
        try:
            written = await conn.fetchval(WRITE_EPOCH, epoch, primary_name)
        except asyncpg.UndefinedTableError:
            await conn.execute(EPOCH_DDL)
            written = await conn.fetchval(WRITE_EPOCH, epoch, primary_name)
        if written is not None:
            return EpochWrite(epoch, True)
        stored = await conn.fetchval(READ_EPOCH)
        if stored == epoch:
            return EpochWrite(epoch, False)
        raise EpochLower(int(stored), epoch)
    except asyncpg.ReadOnlySQLTransactionError as exc:  # went into recovery meanwhile
        raise NotPrimary("a standby takes no writes") from exc
    finally:
        await conn.close()


async def read_epoch(dsn: str) -> int | None:
    """The stored epoch (None when the table or its row does not exist yet)."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        return await conn.fetchval(READ_EPOCH)
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()
