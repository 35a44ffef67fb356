"""Lease sequencers: how a step says which acquisition of a lease it runs under.

A runner holding a lease (failover/lease.py: a Consul lock) gets a number with each
acquisition, larger than every earlier acquisition's (the lock key's ModifyIndex). It
sends `X-Boxoffice-Sequencer: <lock>:<n>` with every step that changes a server or a
shard's rows. The receiver (the booking service, in the shard's own database; the node
agent, in a file of its own) keeps the newest number it has seen per lock and refuses
a step that carries an older one, so a runner that lost its lease (paused past it, and
the lock taken since by another) changes nothing when it wakes up. A request without
the header is not fenced this way (a booking, the node agent's own supervision).
"""

from __future__ import annotations

SEQUENCER_HEADER = "X-Boxoffice-Sequencer"
MAX_LOCK_NAME = 200


def format_fence(lock: str, sequencer: int) -> str:
    return f"{lock}:{sequencer}"


def parse_fence(value: str | None) -> tuple[str, int] | None:
    """(lock, sequencer) of a header value; None when there is none; ValueError when
    it is malformed."""
    if value is None or value == "":
        return None
    lock, sep, number = value.rpartition(":")
    if (not sep or not lock or len(lock) > MAX_LOCK_NAME or "/" in lock or lock.strip() != lock
            or not number.isdigit() or not 0 < int(number) < 2**63):
        raise ValueError(f"not a sequencer: {value[:120]!r}")
    return lock, int(number)
