"""The gateway's overload protection, built from its configuration.

Installed by `create_app` after the request-id, metrics and problem middlewares (so
a 429 or 503 carries the request id and is counted), and before every handler (so a
refused request never reads its body, touches the map or calls a booking service):

1. per-client booking rate limit: `POST /api/bookings` and `.../cancel` beyond
   `booking_rate_per_second` (burst `booking_burst`) per client address answer 429
   `rate-limited` with `Retry-After`;
2. load shedding: every `/api/` route but `/api/health` and `/api/ready` takes a slot
   of its class (`max_in_flight_reads`, `max_in_flight_bookings`), waiting at most
   `read_queue_ms` / `booking_queue_ms`; otherwise 503 `overloaded` with `Retry-After`.
   Reads are shed first (see `common.admission`);
3. the process's event-loop lag: while the loop runs timers later than `read_lag_ms`
   (reads) or `booking_lag_ms` (bookings) for a whole 100 ms window, new requests of
   that class answer 503 `overloaded` at once. On a CPU-bound machine this is what
   grows first: requests queue in the loop before any slot is taken.

The client is the connecting address. A gateway behind a load balancer would be
configured with that balancer as a trusted hop and take the address the balancer
appended to `X-Forwarded-For` (its last entry); the header as a client sends it is
never trusted, or any client could pick a fresh bucket for every request.
"""

from __future__ import annotations

from common.admission import (
    GATEWAY_DEFAULTS,
    Protection,
    ProtectionSettings,
    build_protection,
)

PROCESS = "gateway"

__all__ = ["GATEWAY_DEFAULTS", "PROCESS", "ProtectionSettings", "gateway_protection"]


def gateway_protection(settings: ProtectionSettings) -> Protection:
    """The rate-limit and shedding middlewares for these settings (none when all are off)
    and the lag monitor they read: add `.lifecycle` to the app's `cleanup_ctx`."""
    return build_protection(settings, PROCESS)
