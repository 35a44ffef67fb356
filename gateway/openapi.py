"""The API document: OpenAPI 3.1 built from the message types, served by every gateway.

    GET /api/openapi.json   the document (JSON Schema 2020-12 from common/messages.py)
    GET /api/docs           the same, as a plain HTML reference (server-side, no script,
                            nothing loaded from elsewhere: it works offline)

`ROUTES` is the table the document is built from: one `Route` per method and path a
gateway serves, in aiohttp's spelling (`/api/bookings/{booking_id}`; the document spells
parameters in camelCase, `{bookingId}`). Adding a route to the gateway means adding its
entry here (and its body types, if new, to common/messages.py: the entry names them and
the document picks them up): tests/test_openapi.py fails for any route of a running
gateway's router that has no entry (the pages' scripts and style sheets are listed,
with the reason, in `STATIC_FILES`).

What an entry implies, so that it stays one line or three:
- its path parameters: from `PATH_PARAMETERS` (a malformed id is a 404: it names nothing);
- problem documents (`application/problem+json`): 400, 413, 415 when it takes a body;
  404 when its path has a parameter; 401 and 403 for an operator route (which also
  declares the `operatorToken` bearer scheme); 503 for every route the gateway sheds
  (`common.admission.route_class`: `/api/` but health and readiness); plus the entry's
  own `errors`.
"""

from __future__ import annotations

import html
import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from common import messages as m
from common.admission import route_class
from common.api import BOOKING_SECRET_HEADER, IDEMPOTENCY_KEY_HEADER
from common.cursor import MAX_CURSOR_CHARS
from common.problems import PROBLEM_CONTENT_TYPE, TITLES
from gateway.consistency import HEADER_NAME as CONSISTENCY_HEADER
from gateway.routing import REGION_HEADER

OPENAPI_PATH = "/api/openapi.json"
DOCS_PATH = "/api/docs"
SCHEMAS = "#/components/schemas/"


@dataclass(frozen=True)
class Media:
    """A body that is not one of the message types: its media type and JSON Schema."""

    media_type: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


HTML = Media("text/html")
JSON_DOCUMENT = Media("application/json", {"type": "object"})
FORM = Media("application/x-www-form-urlencoded", {"$ref": SCHEMAS + "OperatorLogin"})
Body = type[msgspec.Struct] | Media | None  # None: no body


@dataclass(frozen=True)
class Route:
    """One operation. `ok`: its success statuses and their bodies; `errors`: the problem
    statuses it adds to those implied (module docstring); `links`: per status, OpenAPI
    links to other operations (by operationId: {parameter: runtime expression})."""

    method: str
    path: str
    operation_id: str
    summary: str
    ok: Mapping[int, Body]
    tag: str
    request: Body = None
    errors: tuple[int, ...] = ()
    query: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    required_headers: tuple[str, ...] = ()  # of `headers`: the operation needs them
    operator: bool = False
    optional_operator: bool = False  # anyone, but the operator token shows more
    description: str = ""
    links: Mapping[int, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    response_headers: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


_UUID_SCHEMA = {"type": "string", "format": "uuid", "pattern": m.UUID_PATTERN}
PATH_PARAMETERS: dict[str, tuple[str, dict[str, Any]]] = {  # aiohttp name -> (meaning, schema)
    "event_id": ("The event's id.", _UUID_SCHEMA),
    "booking_id": ("The booking's id (from the booking's answer).", _UUID_SCHEMA),
    "shard": ("The shard's name, as in the region map.", {"type": "string"}),
}
QUERY_PARAMETERS: dict[str, dict[str, Any]] = {
    "limit": {"description": "Events per page, 1 to 200 (default 50).",
              "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}},
    "cursor": {"description": "The `nextCursor` of the previous page (opaque); empty or "
                              "absent: the first page.",
               "schema": {"type": "string", "maxLength": MAX_CURSOR_CHARS}},
    "shard": {"description": "Only this shard's events.",
              "schema": {"type": "string", "minLength": 1, "maxLength": 100}},
}
_SECRET_SCHEMA = {"type": "string", "minLength": m.MIN_SECRET_LENGTH,
                  "maxLength": m.MAX_SECRET_LENGTH, "pattern": m.BOOKING_SECRET_PATTERN}
HEADER_PARAMETERS: dict[str, dict[str, Any]] = {
    BOOKING_SECRET_HEADER: {
        "description": f"The buyer's secret, {m.MIN_SECRET_LENGTH} to {m.MAX_SECRET_LENGTH} "
                       "URL-safe characters (anything else is a 400). On a booking: the "
                       "client's own (else the gateway makes one and returns it); a replay of a "
                       "reference needs the secret it was booked with. On a read or a cancel: "
                       "without the booking's secret the answer is the 404 of an unknown id.",
        "schema": _SECRET_SCHEMA},
    IDEMPOTENCY_KEY_HEADER: {
        "description": "The client reference when the body has none: 1 to "
                       f"{m.MAX_REFERENCE_LENGTH} printable characters (checked whenever "
                       "sent). Sending the same booking again with it replays the first answer.",
        "schema": {"type": "string", "minLength": 1, "maxLength": m.MAX_REFERENCE_LENGTH}},
    REGION_HEADER: {
        "description": "The client's region (reads go to the nearest copy); default: the "
                       "region of its address, else this gateway's.",
        "schema": {"type": "string"}},
    CONSISTENCY_HEADER: {
        "description": "The consistency token a write answered (also kept in a cookie): a "
                       "read after it sees the write. An unknown token is ignored.",
        "schema": {"type": "string"}},
}
RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "The new booking's path.", "schema": {"type": "string"}},
    BOOKING_SECRET_HEADER: {
        "description": "The booking's secret (the client's, or the one the gateway made), on "
                       "every answer to a booking request, 503s included: keep it; it replays, "
                       "reads and cancels the booking, and nothing else does.",
        "schema": _SECRET_SCHEMA},
    IDEMPOTENCY_KEY_HEADER: {
        "description": "The key the gateway booked under when the request had no reference: "
                       "send the request again with it to learn the outcome, never to book twice.",
        "schema": {"type": "string"}},
    CONSISTENCY_HEADER: {"description": "Send it with the next reads to see this write.",
                         "schema": {"type": "string"}},
}

_READ_HEADERS = (REGION_HEADER, CONSISTENCY_HEADER)
# From a booking's answer to its read and cancel, with the buyer's secret: the booking
# request's answer carries it as a header; a read's or cancel's request had it.
def _booking_links(secret: str) -> dict[str, dict[str, Any]]:
    parameters = {"bookingId": "$response.body#/id", f"header.{BOOKING_SECRET_HEADER}": secret}
    return {"GetBooking": {"operationId": "getBooking", "parameters": parameters},
            "CancelBooking": {"operationId": "cancelBooking", "parameters": parameters}}


_BOOKING_LINKS = _booking_links(f"$response.header.{BOOKING_SECRET_HEADER}")
_FOLLOW_LINKS = _booking_links(f"$request.header.{BOOKING_SECRET_HEADER}")


def _book_one(tiers: str) -> dict[str, Any]:
    """A link to book one ticket of the first tier at JSON pointer `tiers` of the answer
    (runtime expressions inside `requestBody`, as schemathesis evaluates them)."""
    return {"operationId": "createBooking",
            "requestBody": {"eventId": f"$response.body#{tiers}/0/eventId",
                            "items": [{"ticketTierId": f"$response.body#{tiers}/0/id",
                                       "quantity": 1}]},
            "description": "Book one ticket of the first tier."}


_EVENT_LINKS = {
    "GetEvent": {"operationId": "getEvent", "parameters": {"eventId": "$response.body#/id"}},
    "ListTicketTiers": {"operationId": "listTicketTiers",
                        "parameters": {"eventId": "$response.body#/id"}},
    "EventMoveStatus": {"operationId": "eventMoveStatus",
                        "parameters": {"eventId": "$response.body#/id"}},
}


ROUTES: tuple[Route, ...] = (
    # -- public API --------------------------------------------------------------------
    Route("GET", "/api/events", "listEvents", "List events by start time, a page at a time",
          {200: m.EventPage}, "Events", query=("limit", "cursor"), headers=_READ_HEADERS,
          description="Merged across shards; anonymous pages are cached for about a second."),
    Route("GET", "/api/events/{event_id}", "getEvent", "One event",
          {200: m.Event}, "Events", headers=_READ_HEADERS),
    Route("GET", "/api/events/{event_id}/ticket-tiers", "listTicketTiers",
          "An event's ticket tiers and what is left of each", {200: m.TicketTiers}, "Events",
          headers=_READ_HEADERS, links={200: {"BookFirstTier": _book_one("/ticketTiers")}}),
    Route("POST", "/api/bookings", "createBooking", "Book tickets (idempotent by reference)",
          {201: m.Booking, 200: m.Booking}, "Bookings", request=m.BookingRequest,
          errors=(404, 409, 422, 429, 504),
          headers=(BOOKING_SECRET_HEADER, IDEMPOTENCY_KEY_HEADER, CONSISTENCY_HEADER),
          description="201: booked; the body's `bookingSecret` and the `Booking-Secret` header "
                      "carry the buyer's secret (keep it). 200: this reference already names "
                      "this buyer's booking (a replay: same secret, same event and items). "
                      "409 `client-reference-in-use`: the reference names a booking and the "
                      "request has not its secret (the same answer whatever the event and "
                      "items; never the booking or its id). 409 `insufficient-inventory`: sold "
                      "out, nothing booked. 422: a tier of another event, or the buyer reusing "
                      "its reference for other items. 503 with `Retry-After`: send the same "
                      "request again, with the same key and secret.",
          links={201: _BOOKING_LINKS, 200: _BOOKING_LINKS},
          response_headers={201: ("Location", BOOKING_SECRET_HEADER, IDEMPOTENCY_KEY_HEADER,
                                  CONSISTENCY_HEADER),
                            200: (BOOKING_SECRET_HEADER, IDEMPOTENCY_KEY_HEADER,
                                  CONSISTENCY_HEADER)}),
    Route("GET", "/api/bookings/{booking_id}", "getBooking", "One booking, for its buyer",
          {200: m.Booking}, "Bookings", headers=(BOOKING_SECRET_HEADER, *_READ_HEADERS),
          required_headers=(BOOKING_SECRET_HEADER,), errors=(400,),
          description="Needs the booking's `Booking-Secret`: without it, or with another, "
                      "the answer is the 404 of an id that names no booking.",
          links={200: {"CancelBooking": _FOLLOW_LINKS["CancelBooking"]}}),
    Route("POST", "/api/bookings/{booking_id}/cancel", "cancelBooking",
          "Cancel a booking (cancelling twice is not an error)", {200: m.Booking}, "Bookings",
          errors=(400, 429, 504), headers=(BOOKING_SECRET_HEADER, CONSISTENCY_HEADER),
          required_headers=(BOOKING_SECRET_HEADER,),
          description="Only the buyer cancels: without the booking's `Booking-Secret`, or "
                      "with another, the answer is the 404 of an id that names no booking.",
          response_headers={200: (CONSISTENCY_HEADER,)},
          links={200: {"GetBooking": _FOLLOW_LINKS["GetBooking"]}}),
    Route("GET", "/api/health", "health", "The gateway answers", {200: m.Health}, "Service"),
    Route("GET", "/api/ready", "ready", "The gateway has its region map",
          {200: m.Readiness, 503: m.Readiness}, "Service", optional_operator=True,
          description="Anyone gets the status; with the operator token also the map index, "
                      "breakers, failing copies and settings."),
    Route("GET", OPENAPI_PATH, "openapi", "This document", {200: JSON_DOCUMENT},
          "Documentation"),
    Route("GET", DOCS_PATH, "docs", "This document as an HTML reference", {200: HTML},
          "Documentation"),
    # -- operator API (bearer token; every /admin path authenticates before routing) -------
    Route("GET", "/admin/map", "getRegionMap", "The region map this gateway routes by",
          {200: m.RegionMapDocument}, "Operator", operator=True, errors=(503,)),
    Route("POST", "/admin/events", "createEvent", "Create an event with its tiers and place it",
          {201: m.EventCreated}, "Operator", request=m.NewEvent, operator=True,
          errors=(409, 503, 504),
          description="The placement is written first, then the shard's primary creates the "
                      "event. 503 `shard-unavailable` names the event id: send the same "
                      "request (same id) again to finish. 409 `event-exists` once it exists.",
          links={201: _EVENT_LINKS}),
    Route("GET", "/admin/events", "listPlacedEvents",
          "Every placed event by shard, as each shard's primary has it",
          {200: m.EventListing}, "Operator", operator=True, query=("shard",), errors=(503,)),
    Route("POST", "/admin/events/{event_id}/move", "moveEvent", "Move an event to another shard",
          {200: m.MoveReport}, "Operator", request=m.MoveRequest, operator=True,
          errors=(409, 503),
          description="200 with the move's report. 409: refused or rolled back. 503: a "
                      "dependency failed part-way; the move is journalled and sending the "
                      "request again finishes it (before its flip, `abort` rolls it back)."),
    Route("GET", "/admin/events/{event_id}/move", "eventMoveStatus",
          "An event's placement and its last move's journal", {200: m.MoveStatus}, "Operator",
          operator=True, errors=(503,)),
    Route("POST", "/admin/shards/{shard}/promote", "promoteShard",
          "Promote a copy of a shard now (emergency failover)", {200: m.PromoteReport},
          "Operator", request=m.PromoteRequest, operator=True, errors=(409, 503),
          description="409: refused, nothing changed. 503: a dependency failed; `committed` "
                      "says whether the map names the new primary; send it again to finish."),
    Route("POST", "/admin/shards/{shard}/switchover", "switchoverShard",
          "Planned change of primary to a synchronous standby", {200: m.SwitchoverReport},
          "Operator", request=m.SwitchoverRequest, operator=True, errors=(409, 503)),
    Route("POST", "/admin/drills/failover", "drillFailover", "Run a failover drill",
          {200: m.DrillReport}, "Operator", request=m.DrillRequest, operator=True,
          errors=(409, 503)),
    Route("GET", "/", "webPage", "The booking web page", {200: HTML}, "Pages"),
    # -- operator console (the page's data and its sign-in) ---------------------------------
    Route("GET", "/admin", "consoleRedirect", "To the console page (/admin/)",
          {302: None}, "Console", operator=True),
    Route("GET", "/admin/", "consolePage", "The operator console page", {200: HTML}, "Console",
          operator=True),
    Route("GET", "/operator/login", "loginPage", "The console's sign-in page", {200: HTML},
          "Console"),
    Route("GET", "/admin/api/state", "consoleState", "What the console draws",
          {200: m.ConsoleState}, "Console", operator=True),
    Route("POST", "/operator/login", "operatorLogin",
          "Sign the console in: sets its session cookie (HttpOnly, SameSite=Strict); "
          "attempts are throttled per address (429 with Retry-After)",
          {204: None}, "Console", request=FORM, errors=(403, 429)),
    Route("POST", "/operator/logout", "operatorLogout", "Clear the console's session cookie",
          {204: None}, "Console"),
    Route("POST", "/admin/logout", "consoleLogout",
          "Sign the console out: revokes its session on every gateway, clears the cookie",
          {204: None}, "Console", operator=True),
)

# Served but not described: the pages' scripts and style sheets (static files, no
# parameters, no body: nothing for a client to call or a fuzzer to vary).
STATIC_FILES: dict[tuple[str, str], str] = {
    ("GET", "/admin/console.js"): "the console page's script",
    ("GET", "/admin/console.css"): "the console page's style sheet",
    ("GET", "/operator/login.js"): "the sign-in page's script",
    ("GET", "/operator/console.css"): "the sign-in page's style sheet",
}

# Types named by a schema only, not by a route's body (the form's, and every problem's).
EXTRA_TYPES: tuple[type[msgspec.Struct], ...] = (m.ProblemDocument, m.OperatorLogin)


def message_types(routes: tuple[Route, ...]) -> list[type[msgspec.Struct]]:
    """The message types the routes' bodies name (each once), and `EXTRA_TYPES`."""
    bodies = [r.request for r in routes] + [b for r in routes for b in r.ok.values()]
    found = [b for b in bodies if isinstance(b, type) and issubclass(b, msgspec.Struct)]
    return list(dict.fromkeys([*found, *EXTRA_TYPES]))


# -- building the document ---------------------------------------------------------------------

def openapi_path(path: str) -> str:
    """aiohttp's `/api/bookings/{booking_id}` as the document spells it: `{bookingId}`."""
    return re.sub(r"\{(\w+)\}", lambda found: "{" + _camel(found[1]) + "}", path)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _content(body: Body) -> dict[str, Any]:
    if isinstance(body, Media):
        return {body.media_type: {"schema": dict(body.schema)}}
    assert body is not None
    return {"application/json": {"schema": {"$ref": SCHEMAS + body.__name__}}}


def _problem(status: int) -> dict[str, Any]:
    return {"description": TITLES.get(status, "Error") + " (a problem document)",
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": SCHEMAS + "ProblemDocument"}}}}


def _implied_errors(route: Route) -> set[int]:
    statuses = set(route.errors)
    if route.request is not None:
        statuses |= {400, 413, 415}
    if "{" in route.path:
        statuses.add(404)
    if route.operator:
        statuses |= {401, 403}
    if route_class(route.method, route.path) is not None:
        statuses.add(503)  # shed (overloaded); for a shard's data, no copy answers
    if route.query:
        statuses.add(400)
    return statuses


def _operation(route: Route) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    for name in re.findall(r"\{(\w+)\}", route.path):
        meaning, schema = PATH_PARAMETERS[name]
        parameters.append({"name": _camel(name), "in": "path", "required": True,
                           "description": meaning, "schema": schema})
    parameters += [{"name": name, "in": "query", **QUERY_PARAMETERS[name]} for name in route.query]
    parameters += [{"name": name, "in": "header", **HEADER_PARAMETERS[name],
                    **({"required": True} if name in route.required_headers else {})}
                   for name in route.headers]
    responses: dict[str, Any] = {}
    for status, body in sorted(route.ok.items()):
        response: dict[str, Any] = {"description": TITLES.get(status, _SUCCESS.get(status, "OK"))}
        if body is not None:
            response["content"] = _content(body)
        if route.response_headers.get(status):
            response["headers"] = {h: RESPONSE_HEADERS[h] for h in route.response_headers[status]}
        if status == 302:
            response["headers"] = {"Location": {"schema": {"type": "string"}}}
        if route.links.get(status):
            response["links"] = {name: dict(link) for name, link in route.links[status].items()}
        responses[str(status)] = response
    for status in sorted(_implied_errors(route) - set(route.ok)):
        responses[str(status)] = _problem(status)
    operation: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary,
                                 "tags": [route.tag], "responses": responses}
    if route.description:
        operation["description"] = route.description
    if parameters:
        operation["parameters"] = parameters
    if route.request is not None:
        operation["requestBody"] = {"required": True, "content": _content(route.request)}
    if route.operator:
        operation["security"] = [{"operatorToken": []}]
    elif route.optional_operator:
        operation["security"] = [{}, {"operatorToken": []}]
    return operation


_SUCCESS = {200: "OK", 201: "Created", 204: "No Content", 302: "Found"}


def build_document(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `routes`, schemas from the message types."""
    _, schemas = msgspec.json.schema_components(message_types(routes),
                                                ref_template=SCHEMAS + "{name}")
    for schema in schemas.values():
        if "description" in schema:
            schema["description"] = inspect.cleandoc(schema["description"])
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(openapi_path(route.path), {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Boxoffice API",
            "version": "1",
            "description": "Events, ticket tiers and bookings across regions and shards; the "
                           "operator API and console. Every error is an RFC 9457 problem "
                           "document. Served by every gateway.",
        },
        "tags": [{"name": t} for t in dict.fromkeys(r.tag for r in routes)],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "operatorToken": {
                    "type": "http", "scheme": "bearer",
                    "description": "The operator token (BOXOFFICE_ADMIN_TOKEN). The console's "
                                   "session cookie (POST /operator/login) also serves the "
                                   "console's own GETs and POST /admin/logout.",
                },
            },
        },
    }


# -- the HTML reference --------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ccc;margin-top:2.5rem}
section.op{border:1px solid #ddd;border-radius:6px;padding:.2rem 1rem;margin:1rem 0}
.method{font-weight:700;font-family:monospace;padding:0 .4rem;border-radius:3px;background:#e8eef8}
code{font-family:monospace;background:#f4f4f4;padding:0 .2rem}
table{border-collapse:collapse;margin:.4rem 0}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
.auth{color:#8a4b00}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _prose(text: Any) -> str:
    """Escaped text, its `code spans` (as in the document's CommonMark) as <code>."""
    return re.sub(r"`([^`<]+)`", r"<code>\1</code>", _e(text))


def _description(schema: Mapping[str, Any]) -> str:
    """A property's description, or its union branches' (`str | None` keeps it there)."""
    found = [schema.get("description")] + [s.get("description") for s in schema.get("anyOf", [])]
    return next((str(d) for d in found if d), "")


def _schema_text(schema: Mapping[str, Any]) -> str:
    """A property's schema in a few words, links to named types."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return f'<a href="#schema-{_e(name)}">{_e(name)}</a>'
    if "anyOf" in schema:
        return " or ".join(_schema_text(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        text = "list of " + _schema_text(schema.get("items", {}))
    elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        text = "map of " + _schema_text(schema["additionalProperties"])
    elif "enum" in schema:
        text = " | ".join(_e(json.dumps(v)) for v in schema["enum"])
    else:
        text = _e(kind)
    limits = [f"{k} {schema[k]}" for k in ("format", "minimum", "maximum", "minLength",
                                             "maxLength", "minItems", "maxItems") if k in schema]
    return text + (f" <small>({_e(', '.join(limits))})</small>" if limits else "")


def _schema_table(name: str, schema: Mapping[str, Any]) -> str:
    rows = []
    required = set(schema.get("required", ()))
    for prop, sub in schema.get("properties", {}).items():
        rows.append(f"<tr><td><code>{_e(prop)}</code>{' *' if prop in required else ''}</td>"
                    f"<td>{_schema_text(sub)}</td><td>{_prose(_description(sub))}</td></tr>")
    return (f'<section id="schema-{_e(name)}"><h3>{_e(name)}</h3>'
            f"<p>{_prose(schema.get('description', ''))}</p>"
            "<table><tr><th>field (* required)</th><th>type</th><th>rule</th></tr>"
            + "".join(rows) + "</table></section>")


def render_reference(document: Mapping[str, Any]) -> str:
    """`document` as one self-contained HTML page (no script, nothing fetched)."""
    parts = [f"<h1>{_e(document['info']['title'])}</h1>",
             f"<p>{_e(document['info']['description'])}</p>",
             f'<p>Machine-readable: <a href="{OPENAPI_PATH}">{OPENAPI_PATH}</a> (OpenAPI '
             f"{_e(document['openapi'])}).</p>"]
    for tag in document["tags"]:
        parts.append(f"<h2>{_e(tag['name'])}</h2>")
        for path, operations in document["paths"].items():
            for method, op in operations.items():
                if tag["name"] in op["tags"]:
                    parts.append(_operation_html(method, path, op))
    parts.append("<h2>Schemas</h2>")
    parts += [_schema_table(name, schema)
              for name, schema in document["components"]["schemas"].items()]
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{_e(document['info']['title'])}</title><style>{_STYLE}</style></head>"
            "<body>" + "".join(parts) + "</body></html>")


def _operation_html(method: str, path: str, op: Mapping[str, Any]) -> str:
    out = [f'<section class="op" id="{_e(op["operationId"])}">',
           f'<h3><span class="method">{_e(method.upper())}</span> <code>{_e(path)}</code></h3>',
           f"<p>{_prose(op['summary'])}.</p>"]
    if op.get("description"):
        out.append(f"<p>{_prose(op['description'])}</p>")
    if any("operatorToken" in s for s in op.get("security", [])):
        optional = {} in op["security"]
        out.append('<p class="auth">' + ("Optional: " if optional else "Needs ")
                   + "the operator token (<code>Authorization: Bearer …</code>).</p>")
    if op.get("parameters"):
        out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>meaning</th></tr>")
        out += [f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
                f"<td>{_schema_text(p['schema'])}</td><td>{_prose(p.get('description', ''))}</td></tr>"
                for p in op["parameters"]]
        out.append("</table>")
    if "requestBody" in op:
        out.append("<p>Body: " + ", ".join(
            f"<code>{_e(media)}</code> {_schema_text(c['schema'])}"
            for media, c in op["requestBody"]["content"].items()) + "</p>")
    out.append("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>")
    for status, response in op["responses"].items():
        bodies = ", ".join(f"<code>{_e(media)}</code> {_schema_text(c['schema'])}"
                           for media, c in response.get("content", {}).items())
        links = ", ".join(f'<a href="#{_e(link["operationId"])}">{_e(name)}</a>'
                          for name, link in response.get("links", {}).items())
        out.append(f"<tr><td>{_e(status)}</td><td>{_e(response['description'])}"
                   + (f"; then: {links}" if links else "") + f"</td><td>{bodies}</td></tr>")
    out.append("</table></section>")
    return "".join(out)


# -- serving -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rendered:
    json: bytes
    html: bytes


RENDERED = web.AppKey("openapi_rendered", _Rendered)
_HEADERS = {"Cache-Control": "public, max-age=60"}


def add_api_doc_routes(app: web.Application) -> None:
    """Register GET /api/openapi.json and GET /api/docs on a gateway's `app` (built once)."""
    document = build_document()
    app[RENDERED] = _Rendered(json.dumps(document).encode(), render_reference(document).encode())

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=request.app[RENDERED].json, content_type="application/json",
                            headers=_HEADERS)

    async def docs(request: web.Request) -> web.Response:
        return web.Response(body=request.app[RENDERED].html, content_type="text/html",
                            charset="utf-8", headers=_HEADERS)

    app.router.add_get(OPENAPI_PATH, openapi)
    app.router.add_get(DOCS_PATH, docs)
