"""Opaque keyset cursors for event listings: (startsAt, id) of the last event sent.

The same cursor works on one shard and across all shards (the gateway merges
shards in (startsAt, id) order), because every shard sorts the same way.

A cursor is a closed type, not a signed blob: `decode_cursor` accepts only what
`Cursor.encode` produces, so anything a client invents is a 400 `invalid-cursor`
before it reaches routing or SQL:
- at most `MAX_CURSOR_CHARS` URL-safe base64 characters (no padding needed);
- decoding to a JSON array of exactly two strings;
- the first a timestamp in the one canonical form `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`
  (ASCII digits, UTC, six fractional digits only when the microseconds are not
  zero) in years `MIN_YEAR`..`MAX_YEAR`, which Python and Postgres both represent;
- the second a UUID in its canonical lower-case hyphenated form.
A cursor carries nothing a client could not learn from the listing itself, so it
needs no signature: forging one only skips ahead in a public list.

The timestamp form is also how every event's `startsAt` is written
(`format_timestamp`), so a cursor taken from an event keeps its full precision.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from common.problems import Problem

MAX_CURSOR_CHARS = 200
MIN_YEAR = 1970
MAX_YEAR = 9999

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{6}))?Z"
)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def format_timestamp(moment: datetime) -> str:
    """The canonical UTC form: `2027-03-14T20:00:00Z`, `2027-03-14T20:00:00.500000Z`."""
    if moment.tzinfo is None:
        raise ValueError("a timestamp needs a time zone")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def parse_timestamp(text: str) -> datetime | None:
    """A timestamp in exactly the canonical form, in range; None for anything else."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction = match.groups()
    if not MIN_YEAR <= int(year) <= MAX_YEAR or fraction == "000000":
        return None
    try:
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                        int(fraction or "0"), tzinfo=UTC)
    except ValueError:  # 2027-02-30 and the like
        return None


@dataclass(frozen=True, order=True)
class Cursor:
    """The position after an event: listings continue at (starts_at, event_id) > this."""

    starts_at: datetime
    event_id: uuid.UUID

    def encode(self) -> str:
        return encode_cursor(format_timestamp(self.starts_at), str(self.event_id))


def encode_cursor(starts_at: str, event_id: str) -> str:
    """Encode the two strings as given (callers pass canonical ones; see `Cursor.encode`)."""
    raw = json.dumps([starts_at, event_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def invalid_cursor() -> Problem:
    return Problem(
        400, "invalid-cursor", "cursor is not a value this API returned.",
        errors=[{"field": "cursor", "detail": "unrecognised cursor"}],
    )


def decode_cursor(raw: str | None) -> Cursor | None:
    """The cursor a listing continues after (None for the first page), or a 400."""
    if raw is None or raw == "":
        return None
    if len(raw) > MAX_CURSOR_CHARS or not _BASE64URL.fullmatch(raw):
        raise invalid_cursor()
    try:
        unpadded = raw.rstrip("=")
        decoded = json.loads(base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        raise invalid_cursor() from None
    if (not isinstance(decoded, list) or len(decoded) != 2
            or not all(isinstance(part, str) for part in decoded)):
        raise invalid_cursor()
    starts_at = parse_timestamp(decoded[0])
    if starts_at is None or not _UUID.fullmatch(decoded[1]):
        raise invalid_cursor()
    return Cursor(starts_at, uuid.UUID(decoded[1]))
