"""The public API's requests, parsed strictly (shared by gateway and service).

Everything a client sends is checked here before any routing or SQL: content type,
size, JSON syntax (`parse_json`: the stdlib parser with limits, for exact error
positions), then shape, types and bounds by converting to the message types of
`common.messages` (msgspec, strict: `true` is not an integer), then the domain rules
JSON Schema cannot say, beside them here: a tier named twice, printable text, the
`Idempotency-Key` fallback for the client reference, a start in years 1970-9999 in
UTC. A bad request never reaches a database. A refused field is a 400
`invalid-request` whose `errors[0].field` is its path ("items[0].quantity").
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.http import HttpProcessingError

from common import messages
from common.cursor import MAX_YEAR, MIN_YEAR, format_timestamp
from common.ids import parse_uuid
from common.messages import (
    BOOKING_SECRET_PATTERN,
    MAX_CAPACITY,
    MAX_ITEMS,
    MAX_QUANTITY_PER_ITEM,
    MAX_REFERENCE_LENGTH,
    MAX_SECRET_LENGTH,
    MAX_TIERS,
    MIN_SECRET_LENGTH,
)
from common.problems import Problem

__all__ = [
    "BOOKING_SECRET_HEADER", "IDEMPOTENCY_KEY_HEADER", "MAX_BODY_BYTES", "MAX_CAPACITY",
    "MAX_ITEMS", "MAX_JSON_DEPTH", "MAX_QUANTITY_PER_ITEM", "MAX_REFERENCE_LENGTH", "MAX_TIERS",
    "BookingItem", "BookingRequest", "EventSpec", "TierSpec", "convert", "new_booking_secret",
    "parse_booking_request", "parse_booking_secret", "parse_event_spec", "parse_json",
    "parse_limit", "read_json_object", "require_uuid", "secret_hash",
]

MAX_BODY_BYTES = 16 * 1024
MAX_JSON_DEPTH = 32  # arrays and objects inside one another
MAX_JSON_NUMBER_CHARS = 32  # digits, sign, point and exponent of one number
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
BOOKING_SECRET_HEADER = "Booking-Secret"
_SECRET = re.compile(BOOKING_SECRET_PATTERN.removeprefix("^").removesuffix("$"))
Message = TypeVar("Message", bound=msgspec.Struct)


@dataclass(frozen=True)
class BookingItem:
    ticket_tier_id: uuid.UUID
    quantity: int


@dataclass(frozen=True)
class BookingRequest:
    event_id: uuid.UUID
    client_reference: str | None
    items: tuple[BookingItem, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "eventId": str(self.event_id),
            "clientReference": self.client_reference,
            "items": [
                {"ticketTierId": str(i.ticket_tier_id), "quantity": i.quantity} for i in self.items
            ],
        }


def _invalid(detail: str, field: str) -> Problem:
    return Problem(400, "invalid-request", detail, errors=[{"field": field, "detail": detail}])


async def read_json_object(request: web.Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx problem (415, 413, 400).

    Only an identity-coded body is taken (RFC 7694: 415 with `Accept-Encoding`
    naming what is), and a body whose framing breaks while it is read (bad chunked
    encoding, fewer bytes than its Content-Length) is a 400, like malformed JSON.
    """
    if request.content_type != "application/json":
        raise Problem(
            415,
            "unsupported-media-type",
            f"Send the body as application/json, not {request.content_type or 'nothing'}.",
        )
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise Problem(
            415, "unsupported-content-encoding",
            "Send the body without a Content-Encoding (identity); compressed bodies are not taken.",
            headers={"Accept-Encoding": "identity"},
        )
    if request.content_length is not None and request.content_length > max_bytes:
        raise Problem(413, "body-too-large", f"The body may be at most {max_bytes} bytes.")
    raw = bytearray()
    try:
        async for chunk in request.content.iter_chunked(8192):
            raw += chunk
            if len(raw) > max_bytes:
                raise Problem(413, "body-too-large", f"The body may be at most {max_bytes} bytes.")
    except (HttpProcessingError, ConnectionError):
        raise Problem(
            400, "unreadable-body",
            "The request body could not be read: its framing (chunked encoding or "
            "Content-Length) is broken or the body was cut short.",
        ) from None
    body = parse_json(bytes(raw))
    if not isinstance(body, dict):
        raise Problem(400, "invalid-request", "The body must be a JSON object.")
    return body


class _JsonLimit(ValueError):
    """A JSON value this API refuses to parse (too deep, an absurd number)."""


# A JSON string, unrolled so the regex engine never backtracks (linear in its length).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(rb"[][{}]")


def _check_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse nesting deeper than `limit`, in one pass and without recursion
    (the json module recurses per level and would fail at Python's recursion limit)."""
    outside_strings = _JSON_STRING.sub(b"", raw)
    if outside_strings.count(b"[") + outside_strings.count(b"{") <= limit:
        return
    depth = 0
    for match in _JSON_BRACKET.finditer(outside_strings):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > limit:
            raise _JsonLimit(f"nested more than {limit} levels deep")


def _parse_int(text: str) -> int:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise _JsonLimit(f"a number longer than {MAX_JSON_NUMBER_CHARS} characters")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text) if len(text) <= MAX_JSON_NUMBER_CHARS else float("inf")
    if value in (float("inf"), float("-inf")):
        raise _JsonLimit(f"a number longer than {MAX_JSON_NUMBER_CHARS} characters or out of range")
    return value


def _no_constant(name: str) -> Any:
    raise _JsonLimit(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """Strict JSON with limits, or a 400 whose detail says where (never the parser's text).

    Nesting is capped at `MAX_JSON_DEPTH`, numbers at `MAX_JSON_NUMBER_CHARS`
    characters and a finite value; NaN and Infinity are refused.
    """
    try:
        _check_depth(raw)
        return json.loads(raw, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_no_constant)
    except _JsonLimit as exc:
        raise Problem(400, "malformed-json", f"The body is refused: {exc}.") from None
    except json.JSONDecodeError as exc:
        raise Problem(
            400, "malformed-json",
            f"The body is not valid JSON (line {exc.lineno}, column {exc.colno}).",
        ) from None
    except (UnicodeDecodeError, RecursionError):
        raise Problem(400, "malformed-json", "The body is not valid UTF-8 JSON.") from None


def convert(body: dict[str, Any], message: type[Message]) -> Message:
    """`body` as the message type, strictly (no coercion: `true` is not an integer, `"1"`
    not a number), or a 400 `invalid-request` naming the first wrong field."""
    try:
        return msgspec.convert(body, message, strict=True)
    except msgspec.ValidationError as exc:
        refused = messages.refusal(message, exc)
        raise _invalid(refused.detail(), refused.field) from None


def _uuid(text: str) -> uuid.UUID:
    """A `messages.Uuid` field's value (its pattern and length are checked already)."""
    return uuid.UUID(text)


def parse_booking_request(body: dict[str, Any], idempotency_key: str | None) -> BookingRequest:
    """A booking request: `messages.BookingRequest`, then the rules beside it: the
    reference is printable, and taken from the `Idempotency-Key` header when the body has
    none; the header, when sent, is a valid reference even when the body has one (a
    malformed key is the client's mistake either way); no tier appears twice."""
    request = convert(body, messages.BookingRequest)
    for reference, field in ((request.client_reference, "clientReference"),
                             (idempotency_key, IDEMPOTENCY_KEY_HEADER)):
        if reference is not None and (not 1 <= len(reference) <= MAX_REFERENCE_LENGTH
                                      or not reference.isprintable()):
            raise _invalid(f"{field} must be 1 to {MAX_REFERENCE_LENGTH} printable characters.",
                           field)
    reference = request.client_reference if request.client_reference is not None else idempotency_key
    items: list[BookingItem] = []
    seen: set[uuid.UUID] = set()
    for n, item in enumerate(request.items):
        tier_id = _uuid(item.ticket_tier_id)
        if tier_id in seen:
            raise _invalid(f"items[{n}].ticketTierId repeats an earlier item's tier.", f"items[{n}]")
        seen.add(tier_id)
        items.append(BookingItem(tier_id, item.quantity))
    return BookingRequest(_uuid(request.event_id), reference, tuple(items))


def parse_booking_secret(raw: str | None) -> str | None:
    """A buyer's `Booking-Secret` header: 32 to 128 URL-safe characters (A-Z a-z 0-9 - _),
    or None when absent. Anything else (empty, non-ASCII, another character, too short
    or long) is a 400 `invalid-booking-secret` that never echoes the value."""
    if raw is None:
        return None
    if not _SECRET.fullmatch(raw):
        raise Problem(400, "invalid-booking-secret",
                      f"{BOOKING_SECRET_HEADER} must be {MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} "
                      "URL-safe characters (A-Z, a-z, 0-9, '-', '_').",
                      errors=[{"field": BOOKING_SECRET_HEADER, "detail": "malformed"}])
    return raw


def secret_hash(secret: str) -> bytes:
    """What a shard stores and compares of a secret: its SHA-256."""
    return hashlib.sha256(secret.encode("ascii")).digest()


def new_booking_secret() -> str:
    """A secret for a buyer that sent none (43 URL-safe characters, 256 random bits)."""
    return secrets.token_urlsafe(32)


_LIMIT = re.compile(r"[0-9]{1,4}")  # ASCII digits only: str.isdigit() takes "²" too


def parse_limit(raw: str | None, default: int = 50, maximum: int = 200) -> int:
    if raw is None:
        return default
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= maximum:
        raise _invalid(f"limit must be an integer between 1 and {maximum}.", "limit")
    return int(raw)


def require_uuid(raw: str, what: str) -> uuid.UUID:
    """A path id: a malformed one cannot name anything, so it is a 404."""
    parsed = parse_uuid(raw)
    if parsed is None:
        raise Problem(404, f"{what}-not-found", f"No {what} with id {raw!r}.")
    return parsed


@dataclass(frozen=True)
class TierSpec:
    id: uuid.UUID
    name: str
    price_cents: int
    capacity: int


@dataclass(frozen=True)
class EventSpec:
    id: uuid.UUID
    name: str
    venue: str
    starts_at: str  # canonical UTC (common.cursor.format_timestamp)
    currency: str
    tiers: tuple[TierSpec, ...]
    unlisted: bool = False  # never in the public listing (drills, tests)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "venue": self.venue,
            "startsAt": self.starts_at,
            "currency": self.currency,
            "unlisted": self.unlisted,
            "tiers": [
                {"id": str(t.id), "name": t.name, "priceCents": t.price_cents,
                 "capacity": t.capacity}
                for t in self.tiers
            ],
        }


def _name(value: str, field: str, max_len: int) -> str:
    """A name, trimmed: printable characters only (no NUL, no control or lone surrogate
    characters), 1 to `max_len` of them once trimmed."""
    trimmed = value.strip()
    if not 1 <= len(trimmed) <= max_len or not value.isprintable():
        raise _invalid(f"{field} must be a string of 1 to {max_len} printable characters.", field)
    return trimmed


def _starts_at(value: str) -> str:
    """An ISO 8601 timestamp with a time zone, in years MIN_YEAR..MAX_YEAR once in UTC,
    in canonical UTC form."""
    parsed: datetime | None = None
    if value.isascii():
        try:
            parsed = datetime.fromisoformat(value)
            parsed = parsed.astimezone(UTC) if parsed.tzinfo is not None else None
        except (ValueError, OverflowError):  # OverflowError: no UTC equivalent
            parsed = None
    if parsed is None or not MIN_YEAR <= parsed.year <= MAX_YEAR:
        raise _invalid(
            f"startsAt must be an ISO 8601 timestamp with a time zone, in the years {MIN_YEAR} "
            f"to {MAX_YEAR} (UTC).", "startsAt")
    return format_timestamp(parsed)


def parse_event_spec(body: dict[str, Any]) -> EventSpec:
    """An operator's new event with its tiers: `messages.EventSpec`, then the rules beside
    it: names printable and trimmed, the start in UTC years 1970-9999, no tier name or id
    twice. Ids are generated unless given."""
    spec = convert(body, messages.EventSpec)
    tiers: list[TierSpec] = []
    names: set[str] = set()
    tier_ids: set[uuid.UUID] = set()
    for n, tier in enumerate(spec.tiers):
        where = f"tiers[{n}]."
        name = _name(tier.name, where + "name", 100)
        if name in names:
            raise _invalid(f"{where}name repeats another tier's name.", where + "name")
        names.add(name)
        tier_id = uuid.uuid4() if tier.id is msgspec.UNSET else _uuid(tier.id)
        if tier_id in tier_ids:
            raise _invalid(f"{where}id repeats another tier's id.", where + "id")
        tier_ids.add(tier_id)
        tiers.append(TierSpec(tier_id, name, tier.price_cents, tier.capacity))
    return EventSpec(
        id=uuid.uuid4() if spec.id is msgspec.UNSET else _uuid(spec.id),
        name=_name(spec.name, "name", 200),
        venue=_name(spec.venue, "venue", 200),
        starts_at=_starts_at(spec.starts_at),
        currency=spec.currency,
        tiers=tuple(tiers),
        unlisted=spec.unlisted,
    )
