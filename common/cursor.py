"""Opaque keyset cursors for event listings: (startsAt, id) of the last event sent.

The same cursor works on one shard and across all shards (the gateway merges
shards in (startsAt, id) order), because every shard sorts the same way.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from common.problems import Problem


@dataclass(frozen=True)
class Cursor:
    starts_at: datetime
    event_id: uuid.UUID


def encode_cursor(starts_at: str, event_id: str) -> str:
    raw = json.dumps([starts_at, event_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(raw: str | None) -> Cursor | None:
    if raw is None or raw == "":
        return None
    try:
        padded = raw + "=" * (-len(raw) % 4)
        starts_at, event_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return Cursor(datetime.fromisoformat(starts_at.replace("Z", "+00:00")), uuid.UUID(event_id))
    except (ValueError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        raise Problem(
            400, "invalid-cursor", "cursor is not a value this API returned.",
            errors=[{"field": "cursor", "detail": "unrecognised cursor"}],
        ) from None
