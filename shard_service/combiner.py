"""Bookings of a shard committed in batches: the per-shard combiner.

A hot tier sells at most one booking per commit when every booking is its own
transaction: the tier's row lock is held through the commit and through the
synchronous-replication wait. The combiner turns the requests that arrive while
a batch is in flight into the next batch: one CALL of
`boxoffice_book_committed_batch` (shard_service/sql/booking.sql), so one round
trip, one transaction, one commit and one synchronous wait for all of them.

Rules:
- No timer. A request that finds the combiner idle goes at once, as a batch of
  one; requests that arrive while a batch is in flight queue and go together as
  soon as it is done, at most `max_size` per batch, in arrival order.
- One batch in flight per shard (`concurrency`, default 1): batches of a hot
  tier serialise on its row lock anyway, and a second batch in flight only
  halves the next one (docs/benchmarks.md, "Batching").
- Each request keeps its own deadline. One whose caller gave up (hung up, or
  its deadline passed) before its batch is sent is dropped from it; the budget
  each request has left goes with the batch, and the procedure skips a request
  it reaches after its budget (`expired`, nothing written). A batch whose every
  caller has gone is cancelled (it rolls back unless it is already committing).
  The statement's own timeout is the latest deadline of its requests.
- A batch carries one epoch: requests routed by another epoch wait for the next
  batch (the database fences a batch whole, or not at all).
- A batch is sent through the write path's own commit (shard_service/write_path.py:
  connection, synchronous-wait watch, CALL); each request is then answered through
  the write path's checks, like any write. A cancelled synchronous wait leaves the
  whole batch unconfirmed: every request of it is answered 503 `not-confirmed`.
- A database error that is not the server's or the connection's (it should not
  happen: every refusal is an outcome) fails the batch before its commit, so
  nothing was written; its requests are then sent again one per batch, so the
  error reaches only the request that causes it.

Metrics, per shard: `boxoffice_booking_batch_size` (requests per batch sent),
`boxoffice_booking_batch_queue_seconds` (time from a request's arrival at the
combiner to its batch being sent), `boxoffice_booking_batch_queued` (requests
waiting for the next batch).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import Gauge, Histogram

from common.api import BookingRequest
from common.deadlines import Deadline
from common.problems import Problem
from shard_service import queries
from shard_service.write_path import Committed, ConnectionSource, commit, deadline_exceeded

log = logging.getLogger("boxoffice.shard_service.combiner")

DEFAULT_MAX_SIZE = 64

BATCH_SIZE = Histogram(
    "boxoffice_booking_batch_size",
    "Booking requests per batch sent to the shard's database",
    ["shard"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_SECONDS = Histogram(
    "boxoffice_booking_batch_queue_seconds",
    "Time a booking request waited in its shard's combiner before its batch was sent",
    ["shard"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
QUEUED = Gauge(
    "boxoffice_booking_batch_queued",
    "Booking requests waiting in the shard's combiner for the next batch",
    ["shard"],
)

# Errors that are the server's or the connection's, not one request's: the whole
# batch gets them (the service answers them 503, as for a single booking).
_NOT_A_REQUESTS_ERROR = (
    asyncpg.OperatorInterventionError,  # cancelled, shutting down
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
)


@dataclass(frozen=True)
class BatchSettings:
    """`enabled`: bookings go through the combiner (on by default; off: one CALL per
    booking, see docs/benchmarks.md, "Batching"); `max_size`: requests per batch at
    most; `concurrency`: batches in flight per shard."""

    enabled: bool = True
    max_size: int = DEFAULT_MAX_SIZE
    concurrency: int = 1

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.concurrency < 1:
            raise ValueError("a batch holds at least one request, and one batch is in flight")


@dataclass(frozen=True)
class BookingCall:
    """One booking request as the service sends it: a fresh booking id, the parsed
    request, the epoch it is fenced by, its caller's deadline, and the SHA-256 of its
    buyer's secret (None: none was sent), stored with the booking and compared on a
    replay, as for a single booking."""

    booking_id: uuid.UUID
    request: BookingRequest
    epoch: int
    deadline: Deadline
    secret_hash: bytes | None


BookingResult = Committed  # one request's answer; `confirmed`: its batch's wait was not cancelled


@dataclass(eq=False)
class _Pending:
    call: BookingCall
    future: asyncio.Future[BookingResult]
    queued_at: float = field(default_factory=time.monotonic)
    batch: _Batch | None = None
    abandoned: bool = False
    waiting: bool = True  # counted in the queue gauge (queued, and its caller still there)


@dataclass(eq=False)
class _Batch:
    members: list[_Pending]
    live: int = 0
    task: asyncio.Task[None] | None = None


class BookingCombiner:
    """The combiner of one shard. `connection(deadline)` lends a pooled connection
    within a deadline (the service's, which turns running out of time into a 503)."""

    def __init__(self, shard: str, connection: ConnectionSource, settings: BatchSettings) -> None:
        self.shard = shard
        self.settings = settings
        self._connection = connection
        self._queue: collections.deque[_Pending] = collections.deque()
        self._runners: set[asyncio.Task[None]] = set()
        self._closed = False
        self._size = BATCH_SIZE.labels(shard)
        self._queue_time = QUEUE_SECONDS.labels(shard)
        self._queued = QUEUED.labels(shard)
        self._waiting = 0  # queued requests whose caller still waits

    async def book(self, call: BookingCall) -> BookingResult:
        """Queue `call`, and wait for its batch's answer or its deadline (503
        `deadline-exceeded`). A caller cancelled while waiting leaves its request
        dropped (if not sent yet) or its batch one caller fewer."""
        if self._closed:
            raise Problem(503, "not-ready", "The booking service is stopping.",
                          headers={"Retry-After": "1"})
        pending = _Pending(call, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._waiting += 1
        self._queued.set(self._waiting)
        self._start_runners()
        try:
            done, _ = await asyncio.wait({pending.future}, timeout=call.deadline.remaining(floor=0))
        except asyncio.CancelledError:
            self._abandon(pending)
            raise
        if not done:
            self._abandon(pending)
            raise deadline_exceeded()
        return pending.future.result()

    async def close(self) -> None:
        """Stop: a batch in flight is cancelled (its requests answer 503 `cancelled`),
        queued requests are answered 503 `not-ready`, and the queue gauge ends at 0,
        even if closing is itself cancelled while it waits for the runners."""
        self._closed = True
        try:
            for runner in list(self._runners):
                runner.cancel()
            for runner in list(self._runners):
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
        finally:
            stopping = Problem(503, "not-ready", "The booking service is stopping.",
                               headers={"Retry-After": "1"})
            while self._queue:
                self._fail(self._unwait(self._queue.popleft()), stopping)
            self._waiting = 0  # nothing is queued any more, whatever was counted
            self._queued.set(0)

    # -- the queue -------------------------------------------------------------
    def _start_runners(self) -> None:
        while (not self._closed and self._queue
               and len(self._runners) < self.settings.concurrency):
            runner = asyncio.create_task(self._run(), name=f"combiner-{self.shard}")
            self._runners.add(runner)
            runner.add_done_callback(self._runner_done)

    def _runner_done(self, runner: asyncio.Task[None]) -> None:
        self._runners.discard(runner)
        if not runner.cancelled() and runner.exception() is not None:
            log.error("booking combiner failed", exc_info=runner.exception())
        self._start_runners()  # requests queued as it stopped

    def _take(self) -> list[_Pending]:
        """The next batch: queued requests in arrival order, skipping those whose caller
        has gone, up to `max_size`, all of the first one's epoch."""
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.settings.max_size:
            head = self._queue[0]
            if head.abandoned or head.future.done() or head.call.deadline.expired:
                self._unwait(self._queue.popleft())  # dropped: its caller answers at its deadline
                continue
            if batch and head.call.epoch != batch[0].call.epoch:
                break
            batch.append(self._unwait(self._queue.popleft()))
        return batch

    def _unwait(self, pending: _Pending) -> _Pending:
        if pending.waiting:
            pending.waiting = False
            self._waiting -= 1
            self._queued.set(self._waiting)
        return pending

    def _abandon(self, pending: _Pending) -> None:
        pending.abandoned = True
        batch = pending.batch
        if batch is None:
            self._unwait(pending)  # still queued: _take drops it
            return
        batch.live -= 1
        if batch.live == 0 and batch.task is not None and not batch.task.done():
            batch.task.cancel()  # nobody waits for it any more

    async def _run(self) -> None:
        while batch := self._take():
            await self._send(batch)

    async def _send(self, members: list[_Pending]) -> None:
        now = time.monotonic()
        batch = _Batch(members, live=len(members))
        for m in members:
            m.batch = batch
            self._queue_time.observe(now - m.queued_at)
        self._size.observe(len(members))
        batch.task = asyncio.create_task(self._execute(members))
        try:
            await asyncio.shield(batch.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                batch.task.cancel()
                raise
            # the batch alone was cancelled: every caller of it had gone

    # -- the database ------------------------------------------------------------
    async def _execute(self, members: list[_Pending]) -> None:
        try:
            results = await self._call(members)
        except asyncpg.PostgresError as exc:
            if len(members) > 1 and not isinstance(exc, _NOT_A_REQUESTS_ERROR):
                log.warning("a batch failed before its commit; sending its requests one by one",
                            extra={"error": repr(exc), "size": len(members)})
                for m in members:
                    if not m.abandoned:
                        await self._execute([m])
                return
            for m in members:
                self._fail(m, exc)
            return
        except (Exception, asyncio.CancelledError) as exc:
            for m in members:
                self._fail(m, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for m, result in zip(members, results, strict=True):
            if not m.future.done():
                m.future.set_result(result)

    async def _call(self, members: list[_Pending]) -> list[BookingResult]:
        """One CALL for the batch; the answers in request order."""
        deadline = Deadline(max(m.call.deadline.expires_at for m in members))
        item_request: list[int] = []
        item_tiers: list[uuid.UUID] = []
        item_quantities: list[int] = []
        for n, m in enumerate(members, start=1):
            for item in m.call.request.items:
                item_request.append(n)
                item_tiers.append(item.ticket_tier_id)
                item_quantities.append(item.quantity)
        row, confirmed = await commit(  # the write path's steps 3 to 5 (write_path.py)
            self._connection, deadline, queries.BOOK_BATCH,
            [m.call.booking_id for m in members],
            [m.call.request.event_id for m in members],
            [m.call.request.client_reference for m in members],
            [m.call.secret_hash for m in members],
            [int(m.call.deadline.remaining(floor=0) * 1000) for m in members],
            item_request, item_tiers, item_quantities,
            members[0].call.epoch,
        )
        outcomes, bodies, lsn = row["outcomes"], row["bodies"], row["commit_lsn"]
        return [BookingResult(o, b, lsn, confirmed=confirmed)
                for o, b in zip(outcomes, bodies, strict=True)]

    @staticmethod
    def _fail(pending: _Pending, exc: BaseException) -> None:
        if pending.abandoned or pending.future.done():
            return  # nobody would read it
        if isinstance(exc, asyncio.CancelledError):
            exc = Problem(503, "cancelled",
                          "The booking service stopped while the booking was being made; send it "
                          "again with the same key to find out whether it was.",
                          headers={"Retry-After": "1"})
        pending.future.set_exception(exc)

