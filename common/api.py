"""The public API's request shapes, parsed strictly (shared by gateway and service).

Everything a client sends is checked here before any routing or SQL: content
type, size, JSON syntax, types, bounds. A bad request never reaches a database.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError

from common.cursor import MAX_YEAR, MIN_YEAR, format_timestamp
from common.ids import parse_uuid
from common.problems import Problem

MAX_BODY_BYTES = 16 * 1024
MAX_JSON_DEPTH = 32  # arrays and objects inside one another
MAX_JSON_NUMBER_CHARS = 32  # digits, sign, point and exponent of one number
MAX_ITEMS = 10
MAX_QUANTITY_PER_ITEM = 10
MAX_REFERENCE_LENGTH = 200
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"


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


def _strict_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_booking_request(body: dict[str, Any], idempotency_key: str | None) -> BookingRequest:
    event_id = parse_uuid(body.get("eventId"))
    if "eventId" not in body:
        raise _invalid("eventId is required.", "eventId")
    if event_id is None:
        raise _invalid("eventId must be a UUID string.", "eventId")

    reference = body.get("clientReference")
    if reference is None:
        reference = idempotency_key
        field = IDEMPOTENCY_KEY_HEADER
    else:
        field = "clientReference"
    if reference is not None:
        if not isinstance(reference, str):
            raise _invalid("clientReference must be a string.", field)
        if not 1 <= len(reference) <= MAX_REFERENCE_LENGTH or not reference.isprintable():
            raise _invalid(
                f"{field} must be 1 to {MAX_REFERENCE_LENGTH} printable characters.", field
            )

    items = body.get("items")
    if "items" not in body:
        raise _invalid("items is required.", "items")
    if not isinstance(items, list) or not items:
        raise _invalid("items must be a non-empty list.", "items")
    if len(items) > MAX_ITEMS:
        raise _invalid(f"At most {MAX_ITEMS} items per booking.", "items")
    parsed: list[BookingItem] = []
    seen: set[uuid.UUID] = set()
    for n, item in enumerate(items):
        where = f"items[{n}]"
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object.", where)
        tier_id = parse_uuid(item.get("ticketTierId"))
        if tier_id is None:
            raise _invalid(f"{where}.ticketTierId must be a UUID string.", f"{where}.ticketTierId")
        quantity = item.get("quantity")
        if not _strict_int(quantity):
            raise _invalid(f"{where}.quantity must be an integer.", f"{where}.quantity")
        assert isinstance(quantity, int)
        if not 1 <= quantity <= MAX_QUANTITY_PER_ITEM:
            raise _invalid(
                f"{where}.quantity must be between 1 and {MAX_QUANTITY_PER_ITEM}.",
                f"{where}.quantity",
            )
        if tier_id in seen:
            raise _invalid(f"{where}.ticketTierId repeats an earlier item's tier.", where)
        seen.add(tier_id)
        parsed.append(BookingItem(tier_id, quantity))
    return BookingRequest(event_id, reference, tuple(parsed))


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

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "venue": self.venue,
            "startsAt": self.starts_at,
            "currency": self.currency,
            "tiers": [
                {"id": str(t.id), "name": t.name, "priceCents": t.price_cents,
                 "capacity": t.capacity}
                for t in self.tiers
            ],
        }


MAX_TIERS = 20
MAX_CAPACITY = 1_000_000


def _text(body: dict[str, Any], key: str, max_len: int, where: str = "") -> str:
    """A name: printable characters only (no NUL, no control or lone surrogate characters)."""
    value = body.get(key)
    if (not isinstance(value, str) or not 1 <= len(value.strip()) <= max_len
            or not value.isprintable()):
        raise _invalid(
            f"{where}{key} must be a string of 1 to {max_len} printable characters.", where + key)
    return value.strip()


def _starts_at(value: object) -> datetime:
    """An ISO 8601 timestamp with a time zone, in years MIN_YEAR..MAX_YEAR once in UTC."""
    parsed: datetime | None = None
    if isinstance(value, str) and value.isascii() and len(value) <= 40:
        try:
            parsed = datetime.fromisoformat(value)
            parsed = parsed.astimezone(UTC) if parsed.tzinfo is not None else None
        except (ValueError, OverflowError):  # OverflowError: no UTC equivalent
            parsed = None
    if parsed is None or not MIN_YEAR <= parsed.year <= MAX_YEAR:
        raise _invalid(
            f"startsAt must be an ISO 8601 timestamp with a time zone, in the years {MIN_YEAR} "
            f"to {MAX_YEAR} (UTC).", "startsAt")
    return parsed


def parse_event_spec(body: dict[str, Any]) -> EventSpec:
    """An operator's new event with its tiers (ids are generated unless given)."""
    event_id = parse_uuid(body["id"]) if "id" in body else uuid.uuid4()
    if event_id is None:
        raise _invalid("id must be a UUID string.", "id")
    starts_at = _starts_at(body.get("startsAt"))
    currency = body.get("currency", "USD")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isupper():
        raise _invalid("currency must be a 3-letter ISO 4217 code.", "currency")
    tiers_in = body.get("tiers")
    if not isinstance(tiers_in, list) or not 1 <= len(tiers_in) <= MAX_TIERS:
        raise _invalid(f"tiers must be a list of 1 to {MAX_TIERS} tiers.", "tiers")
    tiers: list[TierSpec] = []
    names: set[str] = set()
    tier_ids: set[uuid.UUID] = set()
    for n, tier in enumerate(tiers_in):
        where = f"tiers[{n}]."
        if not isinstance(tier, dict):
            raise _invalid(f"tiers[{n}] must be an object.", f"tiers[{n}]")
        name = _text(tier, "name", 100, where)
        if name in names:
            raise _invalid(f"{where}name repeats another tier's name.", where + "name")
        names.add(name)
        price, capacity = tier.get("priceCents"), tier.get("capacity")
        if not _strict_int(price) or not 0 <= price <= 100_000_000:  # type: ignore[operator]
            raise _invalid(f"{where}priceCents must be a non-negative integer.", where + "priceCents")
        if not _strict_int(capacity) or not 0 <= capacity <= MAX_CAPACITY:  # type: ignore[operator]
            raise _invalid(
                f"{where}capacity must be an integer from 0 to {MAX_CAPACITY}.", where + "capacity"
            )
        tier_id = parse_uuid(tier["id"]) if "id" in tier else uuid.uuid4()
        if tier_id is None:
            raise _invalid(f"{where}id must be a UUID string.", where + "id")
        if tier_id in tier_ids:
            raise _invalid(f"{where}id repeats another tier's id.", where + "id")
        tier_ids.add(tier_id)
        tiers.append(TierSpec(tier_id, name, int(price), int(capacity)))  # type: ignore[arg-type]
    return EventSpec(
        id=event_id,
        name=_text(body, "name", 200),
        venue=_text(body, "venue", 200),
        starts_at=format_timestamp(starts_at),
        currency=currency,
        tiers=tuple(tiers),
    )
