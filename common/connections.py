"""Connection limits of a process's HTTP listeners: slow and greedy clients cannot take
the process off the air (slowloris, descriptor exhaustion).

Rules (enforced by common/server.py's connection handler, for every listener a process
serves through `serve()`):
- A request's headers must be complete within `header_timeout` seconds: of the
  connection's opening for its first request, of the request's first byte for the next
  ones on a kept-alive connection. Otherwise the process answers 408 (a problem
  document) and closes; a connection that never sent a byte is closed without answer.
- A request's body must be complete within `body_timeout` seconds of its headers: the
  handler reading it gets a 408 problem, and the connection is closed after it.
- An idle kept-alive connection is closed after `keepalive_timeout` seconds.
- At most `per_client` connections per client address (`per_client_for`: a sixteenth
  of the total, 256 to 1024) and `total` in all are open at once; a connection beyond
  either is answered 503 with `Retry-After` and closed, before anything of it is read
  (its bytes are read and dropped for up to a second, so the answer is not lost to a
  reset). The process never runs out of descriptors.
- At start the process raises its soft RLIMIT_NOFILE to the hard limit, and `total` is
  derived from it: the descriptors left after a reserve for everything else the process
  opens (database pools, upstream connections, logs, Consul).

The client is the connecting address: a process behind a load balancer would see one
address, and its `per_client` cap must then be raised (BOXOFFICE_MAX_CONNECTIONS_PER_CLIENT).

Settings come from the environment (a process's operator sets them; defaults fit one
gateway per host): BOXOFFICE_HEADER_TIMEOUT, BOXOFFICE_BODY_TIMEOUT,
BOXOFFICE_KEEPALIVE_TIMEOUT (seconds), BOXOFFICE_MAX_CONNECTIONS_PER_CLIENT,
BOXOFFICE_MAX_CONNECTIONS (at most the derived total).

Test: tests/test_slow_clients.py (5,000 partial-header connections from one address;
a normal client books; every one of them is closed).
"""

from __future__ import annotations

import collections
import logging
import os
import resource
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

log = logging.getLogger("boxoffice.server")

DEFAULT_HEADER_TIMEOUT = 20.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_KEEPALIVE_TIMEOUT = 60.0
# Per client address: a sixteenth of the total, at least 256 and at most 1024. Not less:
# on one machine every gateway reaches a booking service from the same address, each
# with up to 256 pooled connections (gateway/upstream.py).
PER_CLIENT_MIN, PER_CLIENT_MAX, PER_CLIENT_SHARE = 256, 1024, 16
FD_RESERVE_FRACTION = 0.2  # of the descriptor limit, for everything but client connections
FD_RESERVE_MIN = 256
NOFILE_CEILING = 1 << 20  # when the hard limit is unlimited

OPEN = Gauge("boxoffice_http_connections", "Client connections open on this process's listeners")
REFUSED = Counter("boxoffice_http_connections_refused_total",
                  "Connections answered 503 and closed at once: over the per-client or total cap",
                  ["reason"])
TIMED_OUT = Counter("boxoffice_http_request_timeouts_total",
                    "Requests whose headers or body did not arrive in time (408 and close)", ["phase"])


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. a container's limit
            log.warning("could not raise RLIMIT_NOFILE", extra={"error": str(exc)})
    return NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft


def total_for(fd_limit: int) -> int:
    """Client connections a process with this descriptor limit may hold."""
    reserve = max(FD_RESERVE_MIN, int(fd_limit * FD_RESERVE_FRACTION))
    return max(16, fd_limit - reserve)


def per_client_for(total: int) -> int:
    """The default cap per client address for a process holding `total` connections."""
    return max(PER_CLIENT_MIN, min(PER_CLIENT_MAX, total // PER_CLIENT_SHARE))


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, not {text!r}") from None
    if value <= 0:
        raise SystemExit(f"{name} must be positive, not {text!r}")
    return value


@dataclass(frozen=True)
class ConnectionSettings:
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    per_client: int = PER_CLIENT_MIN
    total: int = 4096

    @classmethod
    def from_environment(cls, fd_limit: int) -> ConnectionSettings:
        derived = total_for(fd_limit)
        total = int(_env_number("BOXOFFICE_MAX_CONNECTIONS", derived))
        return cls(
            header_timeout=_env_number("BOXOFFICE_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT),
            body_timeout=_env_number("BOXOFFICE_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT),
            keepalive_timeout=_env_number("BOXOFFICE_KEEPALIVE_TIMEOUT", DEFAULT_KEEPALIVE_TIMEOUT),
            per_client=int(_env_number("BOXOFFICE_MAX_CONNECTIONS_PER_CLIENT",
                                       per_client_for(min(total, derived)))),
            total=min(total, derived),
        )


class ConnectionGate:
    """Counts a process's open client connections, per address and in all (one gate is
    shared by every listener of the process)."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self.per_address: collections.Counter[str] = collections.Counter()
        self.total = 0
        self.lingering = 0  # refused connections still being closed (not in `total`)

    def admit(self, address: str) -> str | None:
        """Count a new connection from `address`; or the reason it is refused (uncounted)."""
        if self.total >= self.settings.total:
            REFUSED.labels("total").inc()
            return "total"
        if self.per_address[address] >= self.settings.per_client:
            REFUSED.labels("per-client").inc()
            return "per-client"
        self.per_address[address] += 1
        self.total += 1
        OPEN.inc()
        return None

    def release(self, address: str) -> None:
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]
        self.total -= 1
        OPEN.dec()
