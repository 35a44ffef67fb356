"""Sending a write to its shard's primary: deadlines, idempotent retries, a certain outcome.

The rules, in the order a write meets them:

- Every booking belongs to its buyer (MISSION.md §6) by a secret: the client's
  `Booking-Secret` header (32-128 URL-safe characters; anything else is a 400), else
  one the gateway makes here at the edge (`booking_secret`), so that its own retries
  and ride-through replay the booking. It goes with every attempt, comes back in the
  `Booking-Secret` response header on every answer (503s included) and in the 201
  body as `bookingSecret`; the shard keeps only its SHA-256. A replay, a full read or a
  cancel without it is refused as if the reference or id were unknown to the caller
  (409 `client-reference-in-use`; 404 `booking-not-found`, `not_the_buyers`).
- Every booking travels under an idempotency key: the client's `clientReference`
  (or its `Idempotency-Key` header), else one the gateway makes (`gw-<uuid>`).
  A client that sent none gets the gateway's key back in the `Idempotency-Key`
  response header on every answer, 503s included: sending the same request
  again with that header replays the booking instead of making a second one.
- Every attempt carries a deadline (`X-Boxoffice-Deadline-Ms`) shorter than
  the gateway's own timeout for the attempt, so the booking service gives up
  first: it stops waiting for a pool connection or a row lock, cancels the
  statement (which rolls back) and says 503. A gateway 503 therefore normally
  means "not booked"; the rare exceptions (the cancel arrived after the commit;
  a synchronous-replication wait cancelled, 503 `not-confirmed`) are what the
  returned key is for.
- Every attempt carries the shard epoch it was routed by (`X-Boxoffice-Epoch`,
  common/fencing.py): a booking service whose map is newer refuses it (503
  `stale-epoch`), and the database refuses a copy that is not the epoch's
  primary (503 `fenced`); both are retried with the map re-read.
- Retried, under the same key, until `write_retry_seconds` have passed: no
  answer at all, and 503s about the shard's state (restarting, read-only, not
  the primary, fenced, a stale epoch, a deadline, not confirmed, shedding
  load). Every other answer is final and relayed. Pauses between attempts grow
  and are jittered, so the retries of many clients spread out; a service that
  shed the last attempt (`overloaded`) is not asked again before a pause of the
  order of the `Retry-After` it gave.
- An event being moved to another shard (`event-moving`, 503) is waited for on the
  event's placement, then sent to the shard the map names, under the same key. An
  event moved already (`event-moved`, 421, naming the shard that has it: this
  gateway's map is behind) is sent straight to the named shard (at most
  `MAX_MOVED_HOPS` such hops: a moved event's tombstone may name a shard it left
  again), or, when this map does not know that shard, once the placement moves on.
- Between attempts a write waits on the region map, not on a timer
  (gateway/ride_through.py): a shard in transition (a switchover) holds its
  writes until the map names the new primary, which releases them at once; a
  refusal naming a newer epoch waits for that epoch's map; otherwise the pause
  ends early when the shard's record changes. A write held to the end of its
  window is a 503 `shard-in-transition` (with its key, as every 503).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from common.api import BOOKING_SECRET_HEADER, new_booking_secret, parse_booking_secret
from common.deadlines import DEADLINE_HEADER
from common.fencing import EPOCH_HEADER
from common.problems import Problem
from gateway.ride_through import (
    EPOCH_REFUSALS,
    EVENT_MOVED,
    EVENT_MOVING,
    RideThrough,
    moved_to,
    refusal,
)
from gateway.upstream import UpstreamResponse, Upstreams, UpstreamUnavailable
from region_map import Shard

log = logging.getLogger("boxoffice.gateway.writes")

INTERNAL_KEY_PREFIX = "gw-"
OVERLOADED_PAUSE = 0.25  # seconds before asking a service that shed the last attempt again
SETTLE_PAUSE = 0.02  # seconds: first pause after an epoch refusal with no newer epoch named
MOVE_WAIT_SLICE = 0.5  # seconds a write waits for a moving event's flip before trying again
ACTIVATION_PAUSE = 0.01  # seconds: a moved event's target not yet open (flip to activation)
MAX_MOVED_HOPS = 3


def internal_idempotency_key() -> str:
    return f"{INTERNAL_KEY_PREFIX}{uuid.uuid4()}"


def booking_secret(request: web.Request) -> tuple[str, bool]:
    """The buyer's secret for a booking request, and whether the gateway made it (the
    client sent none). A malformed `Booking-Secret` is a 400 (common.api)."""
    sent = parse_booking_secret(request.headers.get(BOOKING_SECRET_HEADER))
    return (sent, False) if sent is not None else (new_booking_secret(), True)


def not_the_buyers(booking_id: uuid.UUID) -> Problem:
    """The answer to a read or cancel without the buyer's secret: exactly the 404 of an
    id that names no booking (the booking service's for a wrong secret is the same)."""
    return Problem(404, "booking-not-found", f"No booking with id {booking_id}.")


def service_deadline_ms(attempt_timeout: float) -> int:
    """The budget the booking service gets for one attempt: the gateway's timeout
    less a margin for the network both ways, so the service answers first."""
    margin = min(0.5, attempt_timeout * 0.25)
    return max(50, int((attempt_timeout - margin) * 1000))


@dataclass
class WriteOutcome:
    """A final answer from the primary's booking service, and the shard it came from."""

    response: UpstreamResponse
    shard: Shard


class WriteForwarder:
    """Sends writes to the primary of an event's shard, retrying idempotently and riding
    through changes of primary (`ride`: without one, pauses are plain sleeps)."""

    def __init__(
        self,
        upstreams: Upstreams,
        shard_for_event: Callable[[uuid.UUID], Shard],
        *,
        retry_seconds: float,
        attempt_seconds: float,
        ride: RideThrough | None = None,
        shard_named: Callable[[str], Shard | None] | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.shard_for_event = shard_for_event
        self.shard_named = shard_named or (lambda _: None)
        self.retry_seconds = retry_seconds
        self.attempt_seconds = attempt_seconds
        self.ride = ride

    async def send(
        self, event_id: uuid.UUID, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> WriteOutcome:
        """The primary's final answer; `Problem` 503 when the retry window ran out
        with no answer but 503s (the last 503 is relayed when there was one)."""
        deadline = time.monotonic() + self.retry_seconds
        attempt = refused = hops = 0
        last: WriteOutcome | None = None
        redirect: str | None = None  # the shard an `event-moved` tombstone named
        while True:
            # Re-read each time: the map may have moved on.
            shard = (redirect and self.shard_named(redirect)) or self.shard_for_event(event_id)
            if self.ride is not None and self.ride.in_transition(shard):
                if await self.ride.hold(shard, deadline - time.monotonic()) is None:
                    raise Problem(503, "shard-in-transition",
                                  f"Shard {shard.name} is changing its primary; the write was "
                                  "not sent. Send it again with the same key.",
                                  headers={"Retry-After": "1"})
                continue
            primary = shard.primary
            timeout = min(self.attempt_seconds, max(deadline - time.monotonic(), 0.2))
            send_headers = {**(headers or {}), DEADLINE_HEADER: str(service_deadline_ms(timeout)),
                            EPOCH_HEADER: str(shard.epoch)}  # the epoch this attempt routed by
            kind, named_epoch, answered = "", None, False
            try:
                resp = await self.upstreams.request(
                    "POST", primary.service_url, path, json_body=body, headers=send_headers,
                    timeout=timeout,
                )
            except UpstreamUnavailable as exc:
                log.warning("write attempt failed", extra={"shard": shard.name, "error": str(exc)})
            else:
                kind, named_epoch = refusal(resp.status, resp.body)
                if resp.status != 503 and not (resp.status == 421 and kind == EVENT_MOVED):
                    return WriteOutcome(resp, shard)
                last, answered = WriteOutcome(resp, shard), True
                log.info("write attempt answered 503" if resp.status == 503
                         else "write attempt answered 421", extra={"shard": shard.name, "kind": kind})
            attempt += 1
            remaining = deadline - time.monotonic()
            if kind == EVENT_MOVED and hops < MAX_MOVED_HOPS and last is not None:
                named = moved_to(last.response.status, last.response.body)
                if named and named != shard.name and self.shard_named(named) is not None:
                    redirect, hops = named, hops + 1
                    continue
            if kind in (EVENT_MOVING, EVENT_MOVED) and self.ride is not None:
                refusal_body = last.response.body if last is not None else b""
                if await self._wait_for_move(event_id, shard, kind, refusal_body, deadline,
                                             attempt):
                    continue
                return self._give_up(shard, last)
            if (self.ride is not None and kind in EPOCH_REFUSALS and named_epoch is not None
                    and named_epoch > shard.epoch):
                # Our map is behind the service's: wait for the newer epoch, then retry there.
                if await self.ride.newer_epoch(shard, remaining) is None:
                    return self._give_up(shard, last)
                continue
            if kind in EPOCH_REFUSALS:
                # No newer epoch named: a new primary finishing its promotion, or a map
                # about to move on. Short pauses at first, growing.
                refused += 1
                pause = min(SETTLE_PAUSE * (1 + refused / 4), 0.5)
            else:
                refused = 0
                pause = min(0.05 * attempt, 0.5)
            if last is not None and _is_overloaded(last.response.body):
                pause = max(pause, OVERLOADED_PAUSE)
            pause *= random.uniform(0.5, 1.5)
            if pause > remaining:
                return self._give_up(shard, last)
            if self.ride is not None:  # a change of the shard's record ends the pause at once
                reason = ("refused" if kind in EPOCH_REFUSALS else "retryable-503" if answered
                          else "unanswered")
                await self.ride.changed(shard, pause, reason)
            else:
                await asyncio.sleep(pause)  # back-off between attempts

    async def _wait_for_move(self, event_id: uuid.UUID, shard: Shard, kind: str, body: bytes,
                             deadline: float, attempt: int) -> bool:
        """Wait for the event's placement to leave `shard`: the rest of the window for a
        finished move (`event-moved`), a slice of it for a freeze (which may roll back
        instead), a short pause for a target not yet activated (growing with `attempt`:
        a move that died between its flip and the activation is resumed by hand). False
        when the window is over."""
        assert self.ride is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if kind == EVENT_MOVING and b'"importing"' in body[:512]:
            pause = min(ACTIVATION_PAUSE * 2 ** min(attempt, 5), 0.25, remaining)
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))  # activation follows the flip
            return True
        wait = remaining if kind == EVENT_MOVED else min(MOVE_WAIT_SLICE, remaining)
        await self.ride.placement_left(str(event_id), shard.name, wait, kind)
        return time.monotonic() < deadline

    @staticmethod
    def _give_up(shard: Shard, last: WriteOutcome | None) -> WriteOutcome:
        if last is not None:
            return last
        raise Problem(503, "shard-unavailable",
                      f"The home region of shard {shard.name} is not answering.",
                      headers={"Retry-After": "1"})


def _is_overloaded(body: bytes) -> bool:
    return b"/overloaded" in body[:512]
