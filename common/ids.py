"""Ids: random UUIDs, and booking ids that carry their event's routing prefix.

A booking id is a version-4 style UUID whose first 8 bytes are the first 8
bytes of its event's id, and whose other bytes are random (62 random bits).
Any gateway can therefore find a booking's event, and from the region map its
shard, without asking every shard, and the id keeps resolving after the event
moves to another shard.
"""

from __future__ import annotations

import os
import re
import uuid

ROUTING_PREFIX_BYTES = 8


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def new_booking_id(event_id: uuid.UUID) -> uuid.UUID:
    tail = bytearray(os.urandom(16 - ROUTING_PREFIX_BYTES))
    tail[0] = (tail[0] & 0x3F) | 0x80  # RFC 4122 variant
    return uuid.UUID(bytes=event_id.bytes[:ROUTING_PREFIX_BYTES] + bytes(tail))


def routing_prefix(any_id: uuid.UUID) -> bytes:
    """The bytes a booking id shares with its event id."""
    return any_id.bytes[:ROUTING_PREFIX_BYTES]


_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(value: object) -> uuid.UUID | None:
    """A UUID in hyphenated hex (ASCII only: uuid.UUID alone would take other digits)."""
    if not isinstance(value, str) or not _UUID_TEXT.fullmatch(value):
        return None
    return uuid.UUID(value)
