"""Noticing a commit whose synchronous-replication wait was cancelled.

With a synchronous standby set, a COMMIT writes its commit record locally and
then waits until a synchronous standby has flushed it. If that wait is
cancelled (pg_cancel_backend, a statement timeout, a cancel request), Postgres
does not fail the statement: it sends a WARNING ("canceling wait for
synchronous replication ... The transaction has already committed locally, but
might not have been replicated to the standby") and carries on, so the CALL
returns its outcome as if nothing had happened. Such a commit is committed
here but not confirmed: a failover now could lose it. The booking service must
answer it 503 `not-confirmed`, never 201; the client's idempotency key replays
it once it is durable (MISSION.md §5).

(A backend terminated in the wait, pg_terminate_backend or a shutdown, sends a
like warning and closes the connection: the caller sees a lost connection, a
503 too.)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from shard_service.connections import Connection

# The message of both cancellations in src/backend/replication/syncrep.c (PG 12-17);
# the detail is the same for both. Servers run with lc_messages C (deploy/postgres.py).
_CANCELLED_WAIT = re.compile(r"^cancel+ing (the )?wait for synchronous replication")
_COMMITTED_LOCALLY = "has already committed locally"


def is_cancelled_sync_wait(message: object) -> bool:
    """Is this server log message (an asyncpg PostgresLogMessage) the warning of a
    cancelled synchronous-replication wait?"""
    severity = getattr(message, "severity_en", None) or getattr(message, "severity", "")
    if str(severity).upper() != "WARNING":
        return False
    text = str(getattr(message, "message", "") or "")
    detail = str(getattr(message, "detail", "") or "")
    return bool(_CANCELLED_WAIT.match(text)) or _COMMITTED_LOCALLY in detail


@dataclass
class SyncWaitWatch:
    cancelled: bool = False  # a commit of this call was not confirmed by a standby


@contextlib.contextmanager
def watch_sync_wait(conn: Connection) -> Iterator[SyncWaitWatch]:
    """Watch `conn` for a cancelled synchronous wait while the block runs.

    The listener is on for this call only (a pooled connection serves others
    next). asyncpg hands each server message to the listener with `call_soon`
    as it parses it, and the warning comes before the statement's result, whose
    waiter is woken through `call_soon` too: the loop runs them in that order, so
    `cancelled` is set by the time the awaited call returns.
    """
    watch = SyncWaitWatch()

    def listener(_: object, message: object) -> None:
        if is_cancelled_sync_wait(message):
            watch.cancelled = True

    conn.add_log_listener(listener)
    try:
        yield watch
    finally:
        # A connection lost mid-call (its server died) is detached from its pool proxy
        # already, listeners and all: removing it then must not replace the caller's
        # exception (the lost connection, a 503) with an InterfaceError of its own.
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.remove_log_listener(listener)
