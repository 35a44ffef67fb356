"""The API's messages: every request and response body of the public and operator API as a
`msgspec.Struct`, camelCase on the wire (`rename="camel"`).

Why msgspec (issue 12): its strict conversion refuses `true` where an integer is due and
`"1"` where a number is (Python's `bool` is an `int`, so hand-written `isinstance` checks
had to remember that every time); it runs in C, which matters on the booking hot path;
and `msgspec.json.schema_components` emits JSON Schema 2020-12, the dialect OpenAPI 3.1
uses, so the API document (gateway/openapi.py) is generated from these very types and
cannot drift from what the services decode.

Rules of this module:
- A field's `description` is its rule as a noun phrase ("an integer from 1 to 10"): the
  document shows it, and a refused request's detail says "<field> must be <rule>."
  (`common.api`). Narrative goes in the type's docstring.
- Request types say what JSON Schema can say (types, bounds, lengths, patterns). What it
  cannot (a repeated tier, printable text, the `Idempotency-Key` fallback, a start that
  must fall in years 1970-9999 once in UTC) is checked by `common.api` right after
  conversion, beside these types.
- Response types describe what the gateway answers. They do not forbid other fields
  (`additionalProperties` is left open), so adding a field is not a breaking change.
- Patterns are anchored and paired with exact lengths: Python's `$` also matches before
  a final newline, the lengths make that impossible.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
from msgspec import UNSET, Meta, Struct, UnsetType

from common.cursor import MAX_YEAR, MIN_YEAR

MAX_ITEMS = 10
MAX_QUANTITY_PER_ITEM = 10
MAX_REFERENCE_LENGTH = 200
MAX_TIERS = 20
MAX_CAPACITY = 1_000_000
MAX_PRICE_CENTS = 100_000_000
MAX_TARGET_LENGTH = 200

UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# A buyer's `Booking-Secret`: 32 to 128 URL-safe characters (common.api.parse_booking_secret).
MIN_SECRET_LENGTH = 32
MAX_SECRET_LENGTH = 128
BOOKING_SECRET_PATTERN = f"^[A-Za-z0-9_-]{{{MIN_SECRET_LENGTH},{MAX_SECRET_LENGTH}}}$"
CURRENCY_PATTERN = "^[A-Z]{3}$"

Uuid = Annotated[str, Meta(min_length=36, max_length=36, pattern=UUID_PATTERN,
                           extra_json_schema={"format": "uuid"}, description="a UUID string")]
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"},
                                description="an RFC 3339 timestamp in UTC")]
Currency = Annotated[str, Meta(min_length=3, max_length=3, pattern=CURRENCY_PATTERN,
                               description="a 3-letter ISO 4217 code")]
Name100 = Annotated[str, Meta(min_length=1, max_length=100,
                              description="a string of 1 to 100 printable characters")]
Name200 = Annotated[str, Meta(min_length=1, max_length=200,
                              description="a string of 1 to 200 printable characters")]


# -- public API: requests ------------------------------------------------------------------

class BookingRequestItem(Struct, rename="camel"):
    """Tickets of one tier."""

    ticket_tier_id: Uuid
    quantity: Annotated[int, Meta(ge=1, le=MAX_QUANTITY_PER_ITEM,
                                  description=f"an integer from 1 to {MAX_QUANTITY_PER_ITEM}")]


class BookingRequest(Struct, rename="camel"):
    """A booking: tickets of one event, all or nothing. The `clientReference` (else the
    `Idempotency-Key` header) makes it idempotent: sent again, the same request answers
    the same booking (200) instead of booking twice. Without either, the gateway makes
    a key of its own and answers it in `Idempotency-Key`."""

    event_id: Uuid
    items: Annotated[list[BookingRequestItem], Meta(
        min_length=1, max_length=MAX_ITEMS,
        description=f"a list of 1 to {MAX_ITEMS} items, each of another tier")]
    client_reference: Annotated[str, Meta(
        min_length=1, max_length=MAX_REFERENCE_LENGTH,
        description=f"a string of 1 to {MAX_REFERENCE_LENGTH} printable characters")] | None = None


# -- public API: responses -----------------------------------------------------------------

class BookingLine(Struct, rename="camel"):
    """Tickets of one tier in a booking, at the price they were sold for."""

    ticket_tier_id: Uuid
    quantity: Annotated[int, Meta(ge=1)]
    unit_price_cents: Annotated[int, Meta(ge=0)]


class Booking(Struct, rename="camel"):
    """A booking. Its id carries its event's routing prefix: any gateway finds it."""

    id: Uuid
    event_id: Uuid
    client_reference: str | None
    status: Literal["confirmed", "cancelled"]
    items: list[BookingLine]
    total_cents: Annotated[int, Meta(ge=0)]
    currency: Currency
    created_at: Timestamp
    cancelled_at: Timestamp | None
    # The buyer's secret (MISSION.md §6), in the answer to the booking request only (201,
    # and a replay's 200): send it as `Booking-Secret` to replay, read or cancel the
    # booking. Never in a read: the buyer has it, nobody else gets it.
    booking_secret: Annotated[str, Meta(pattern=BOOKING_SECRET_PATTERN)] | UnsetType = UNSET


class Event(Struct, rename="camel"):
    """An event, with the shard that holds it and that shard's home region."""

    id: Uuid
    name: str
    venue: str
    starts_at: Timestamp
    currency: Currency
    home_region: str | None
    shard: str


class TicketTier(Struct, rename="camel"):
    """A tier of an event's tickets and how many are left."""

    id: Uuid
    event_id: Uuid
    name: str
    price_cents: Annotated[int, Meta(ge=0)]
    currency: Currency
    capacity: Annotated[int, Meta(ge=0)]
    remaining: Annotated[int, Meta(ge=0)]


class TicketTiers(Struct, rename="camel"):
    """An event's ticket tiers."""

    ticket_tiers: list[TicketTier]


class EventPage(Struct, rename="camel"):
    """A page of events by start time, merged across shards. `nextCursor` (null on the last
    page) is passed as `cursor` for the next page."""

    events: list[Event]
    next_cursor: str | None


class FieldError(Struct):
    """Which field of a request is wrong, and why."""

    field: str
    detail: str


class ProblemDocument(Struct, rename="camel"):
    """An RFC 9457 problem document: every error answer of the API is one
    (`application/problem+json`). `type` ends in a stable slug (`.../invalid-request`);
    some problems carry more members (`errors`, `ticketTierId`, `remaining`, ...)."""

    type: Annotated[str, Meta(extra_json_schema={"format": "uri"})]
    title: str
    status: Annotated[int, Meta(ge=400, le=599)]
    detail: str
    errors: list[FieldError] | UnsetType = UNSET
    request_id: str | UnsetType = UNSET


class Health(Struct):
    """The process answers."""

    status: str
    region: str


class Readiness(Struct, rename="camel"):
    """Ready: the region map is loaded. The other members need the operator token."""

    status: Literal["ok", "not-ready"]
    region: str | UnsetType = UNSET
    map: dict[str, Any] | UnsetType = UNSET
    upstream_breakers: dict[str, str] | UnsetType = UNSET
    failing_services: list[str] | UnsetType = UNSET
    settings: dict[str, Any] | UnsetType = UNSET


# -- operator API ----------------------------------------------------------------------------

class TierSpec(Struct, rename="camel"):
    """A tier of a new event. Its id is generated unless given."""

    name: Name100
    price_cents: Annotated[int, Meta(ge=0, le=MAX_PRICE_CENTS,
                                     description=f"an integer from 0 to {MAX_PRICE_CENTS}")]
    capacity: Annotated[int, Meta(ge=0, le=MAX_CAPACITY,
                                  description=f"an integer from 0 to {MAX_CAPACITY}")]
    id: Uuid | UnsetType = UNSET


class EventSpec(Struct, rename="camel"):
    """A new event with its tiers (as a booking service takes it). Its id is generated
    unless given; names are trimmed. `unlisted`: never in the public listing
    (`GET /api/events`), but readable by id, bookable, moved and audited like any other,
    and marked in the operator's listing (drills, tests)."""

    name: Name200
    venue: Name200
    starts_at: Annotated[str, Meta(
        max_length=40, extra_json_schema={"format": "date-time"},
        description=f"an ISO 8601 timestamp with a time zone, in the years {MIN_YEAR} to "
                    f"{MAX_YEAR} (UTC)")]
    tiers: Annotated[list[TierSpec], Meta(min_length=1, max_length=MAX_TIERS,
                                          description=f"a list of 1 to {MAX_TIERS} tiers")]
    currency: Currency = "USD"
    id: Uuid | UnsetType = UNSET
    unlisted: bool = False


PlaceName = Annotated[str, Meta(min_length=1, max_length=100,
                                description="a name of 1 to 100 printable characters")]


class NewEvent(EventSpec, rename="camel"):
    """A new event, through a gateway: placed on `shard` if given, else on the shard homed
    nearest `venueRegion` (else this gateway's region), the least loaded of those. Sending
    the same request (same id) again finishes a creation an unanswered primary left
    unfinished."""

    shard: PlaceName | None = None
    venue_region: PlaceName | None = None


class EventListing(Struct, rename="camel"):
    """Every placed event by shard, as each shard's primary has it (event_ops/listing.py)."""

    map_index: int
    shards: list[dict[str, Any]]


class MoveRequest(Struct, rename="camel", forbid_unknown_fields=True):
    """Move an event to another shard (`toShard`), or roll back an unfinished move that
    has not flipped yet (`abort`)."""

    to_shard: PlaceName | None = None
    abort: bool = False


class MoveStep(Struct):
    """One step of a move as it ran: its name, how long it took, what it did."""

    step: str
    seconds: float
    detail: str


class MoveReport(Struct, rename="camel"):
    """What a move did (event_ops.move.MoveReport): `moved`, `resumed` (an unfinished move
    finished), `already-there`. `pauseSeconds`: the moved event's writes, from asking the
    source to freeze to the target's activation; `sinceLsn`: the target's position the
    placement carries."""

    event_id: Uuid
    move_id: str
    source: str
    target: str
    outcome: Literal["moved", "resumed", "already-there"]
    bookings_copied: Annotated[int, Meta(ge=0)]
    pages: Annotated[int, Meta(ge=0)]
    rounds: Annotated[int, Meta(ge=0)]
    full_recopy: bool
    pause_seconds: float | None
    seconds: float
    since_lsn: str | None
    steps: list[MoveStep]


class MoveStatus(Struct, rename="camel"):
    """An event's placement and its last move's journal (null when it never moved);
    `side`: `before-flip` or `after-flip` of that move, by the placement."""

    event_id: Uuid
    placement: str | None
    move: dict[str, Any] | None
    side: Literal["before-flip", "after-flip"] | None


class TierCreated(Struct, rename="camel"):
    id: Uuid
    name: str
    price_cents: int
    capacity: int


class EventCreated(Struct, rename="camel"):
    """The created event, where it was placed."""

    id: Uuid
    name: str
    venue: str
    starts_at: Timestamp
    currency: Currency
    tiers: list[TierCreated]
    shard: str
    home_region: str
    unlisted: bool = False


CopyName = Annotated[str, Meta(min_length=1, max_length=MAX_TARGET_LENGTH,
                               description='a copy of the shard: "region" or "region/zone"')]


class PromoteRequest(Struct, forbid_unknown_fields=True):
    """Emergency promotion of a copy. `force` promotes a copy outside the synchronous
    standby set (confirmed bookings may be lost: the report says what)."""

    to: CopyName
    force: bool = False


class SwitchoverRequest(Struct, forbid_unknown_fields=True):
    """A planned change of primary to a synchronous standby (writes held, none lost)."""

    to: CopyName


class Step(Struct):
    name: str
    seconds: float
    detail: Any = None


class PromoteReport(Struct, rename="camel"):
    """What a promotion did, step by step."""

    shard: str
    target: str
    outcome: str
    old_primary: str
    new_primary: str
    old_epoch: int
    new_epoch: int
    epoch_lsn: str | None
    sync_mode: str
    sync_standbys: list[str]
    synchronous_standby_names: str | None
    positions: dict[str, str | None]
    repointed: list[str]
    not_repointed: dict[str, str]
    forced: bool
    lost: dict[str, Any] | None
    resumed: str | None
    old_primary_next: str
    notes: list[str]
    steps: list[Step]
    seconds: float


class SwitchoverReport(PromoteReport, rename="camel"):
    """A promotion's report, plus how long the gateways held the shard's writes."""

    kind: Literal["switchover"]
    writes_held_seconds: float | None
    old_primary_restarted: bool


class DrillRequest(Struct):
    """A failover drill: booking load through every gateway, a fault (or a switchover),
    and an audit that no confirmed booking was lost, oversold or duplicated."""

    shard: Annotated[str, Meta(description="the name of a shard of the map")]
    # failover.drill.KINDS (tests/test_openapi.py checks they agree)
    kind: Literal["kill-primary", "kill-zone", "kill-region", "switchover"] = "kill-primary"


class DrillReport(Struct, rename="camel"):
    """A drill's report (failover/drill.py, failover/drill_report.py): `ok` is false when
    a booking was lost, oversold or duplicated; `outcome` is what the platform did
    (`failed-over`, or `survived-without-failover` with `why`), `expected` what its rules
    say the fault leads to (decided before the fault, with `expectedWhy`); `passed` is
    `ok` and the outcome the expected one. `events` names the drill's (unlisted) events."""

    shard: str
    kind: str
    mode: str
    started_at: str
    ok: bool
    passed: bool
    outcome: str
    expected: str
    old_primary: str
    new_primary: str
    old_epoch: int
    new_epoch: int
    times: dict[str, Any]
    writes: dict[str, Any]
    bookings: dict[str, Any]
    client_errors: dict[str, int]
    fault_hosts: list[str]
    events: dict[str, str]
    restarted: list[str]
    paused_controllers: list[str]
    why: str | None = None
    expected_why: str | None = None
    promotion: dict[str, Any] | None = None


class RegionRecord(Struct, rename="camel"):
    name: str
    gateway_url: str
    location: str
    latency_ms: dict[str, int]


class ShardCopy(Struct, rename="camel"):
    region: str
    zone: str
    service_url: str
    db_address: str


class Transition(Struct):
    kind: str
    target: str
    since: str
    epoch: int


class ShardRecord(Struct, rename="camel"):
    """A shard: its copies, which is the primary, at which epoch."""

    name: str
    epoch: Annotated[int, Meta(ge=1)]
    primary: str
    primary_region: str
    members: dict[str, ShardCopy]
    sync_standbys: list[str]
    epoch_lsn: str | None
    sync_mode: str
    transition: Transition | None


class RegionMapDocument(Struct, rename="camel"):
    """The region map this gateway routes by (Consul's index `index`)."""

    index: int
    regions: dict[str, RegionRecord]
    shards: dict[str, ShardRecord]
    placements: dict[str, str]
    placement_lsns: dict[str, str]


class ConsoleState(Struct, rename="camel"):
    """What the operator console draws (polled about once a second)."""

    generated_at: str
    gateway: dict[str, Any]
    regions: list[dict[str, Any]]
    shards: list[dict[str, Any]]
    operations: list[dict[str, Any]]
    errors: list[str]
    agents: dict[str, Any] | UnsetType = UNSET
    controller: Any = None
    drills: list[Any] | UnsetType = UNSET
    drills_saved: bool | UnsetType = UNSET
    events: list[dict[str, Any]] | UnsetType = UNSET


class OperatorLogin(Struct):
    """The console's sign-in form (`application/x-www-form-urlencoded`)."""

    token: Annotated[str, Meta(min_length=1, description="the operator token")]


# -- reading a refusal ---------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """Why `msgspec.convert` refused a document, in this API's terms.

    `field` is the path of the wrong value ("items[0].quantity"; "" for the document
    itself), `rule` its description (or a plain phrase for its
    type), `missing` whether it was absent, `unknown` an unexpected field's name (then
    `field` is the object holding it and `known` that object's fields)."""

    field: str
    rule: str
    missing: bool = False
    unknown: str | None = None
    known: tuple[str, ...] = ()

    def detail(self) -> str:
        if self.unknown is not None:
            where = f"{self.field} has" if self.field else "Has"
            return f"{where} an unknown field {self.unknown!r} (known: {', '.join(self.known)})."
        if self.missing:
            return f"{self.field} is required."
        return f"{self.field or 'The document'} must be {self.rule}."


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_PLAIN: dict[type[mi.Type], str] = {
    mi.StructType: "an object", mi.DictType: "an object", mi.ListType: "a list",
    mi.TupleType: "a list", mi.VarTupleType: "a list", mi.IntType: "an integer",
    mi.FloatType: "a number", mi.StrType: "a string", mi.BoolType: "true or false",
}


def refusal(root: Any, error: msgspec.ValidationError) -> Refusal:
    """Explain `error`, raised converting a document to the type `root`. (msgspec names
    no dict key in a path, `[...]`: convert a dict's entries one by one to name them.)"""
    found = _AT.match(str(error))
    assert found is not None  # the pattern matches any text
    message, path = found["message"], found["path"] or ""
    node: Any = mi.type_info(root)
    names: list[str] = []
    for name, index in _STEP.findall(path):
        names.append(f".{name}" if name else f"[{index}]")
        node = _step(node, name or index)
    if missing := _MISSING.match(message):
        names.append(f".{missing['name']}")
        node = _step(node, missing["name"])
    field = "".join(names).lstrip(".")
    if unknown := _UNKNOWN.match(message):
        struct = _struct(node)
        known = tuple(f.encode_name for f in struct.fields) if struct else ()
        return Refusal(field, "", unknown=unknown["name"], known=known)
    return Refusal(field, _rule(node), missing=missing is not None)


def _members(node: Any) -> list[Any]:
    """The node itself, or the members of a union (metadata unwrapped)."""
    while isinstance(node, mi.Metadata):
        node = node.type
    if isinstance(node, mi.UnionType):
        return [m.type if isinstance(m, mi.Metadata) else m for m in node.types]
    return [node]


def _struct(node: Any) -> mi.StructType | None:
    return next((m for m in _members(node) if isinstance(m, mi.StructType)), None)


def _step(node: Any, name: str) -> Any:
    """The type of `name` (a field, an index, `...` for a dict value) inside `node`."""
    for member in _members(node):
        if isinstance(member, mi.StructType):
            for f in member.fields:
                if f.encode_name == name:
                    return f.type
        elif isinstance(member, mi.DictType) and name == "...":
            return member.value_type
        elif isinstance(member, mi.ListType | mi.VarTupleType) and name.isdigit():
            return member.item_type
    return None


def _rule(node: Any) -> str:
    """A node's description (its own, else a union member's), else a plain phrase."""
    inner = node.type if isinstance(node, mi.Metadata) else node
    described = [node] + (list(inner.types) if isinstance(inner, mi.UnionType) else [])
    for candidate in described:
        if isinstance(candidate, mi.Metadata):
            schema = candidate.extra_json_schema or {}
            if "description" in schema:
                return str(schema["description"])
    for member in _members(node):
        if isinstance(member, mi.LiteralType):
            return "one of " + ", ".join(str(v) for v in member.values)
        if type(member) in _PLAIN:
            return _PLAIN[type(member)]
    return "valid"
