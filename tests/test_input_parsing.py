"""Pure parsing of hostile client input: cursors, limits, JSON bodies, event specs,
protocol errors. Each case here reached a 500 before; each must be a 400 Problem."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong

from common.api import MAX_JSON_DEPTH, parse_event_spec, parse_json, parse_limit
from common.cursor import MAX_CURSOR_CHARS, Cursor, decode_cursor, format_timestamp
from common.ids import parse_uuid
from common.problems import Problem
from common.server import protocol_problem

ID = "00000000-0000-4000-8000-000000000000"
FULLWIDTH_2027 = "\uff12\uff10\uff12\uff17"  # "2027" in full-width digits
ARABIC_INDIC_ZERO = "\u0660"


def b64(value: Any) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_cursor_round_trip_keeps_microseconds() -> None:
    moment = datetime(2027, 3, 14, 20, 0, 0, 500, tzinfo=UTC)
    event_id = uuid.uuid4()
    encoded = Cursor(moment, event_id).encode()
    assert decode_cursor(encoded) == Cursor(moment, event_id)
    assert format_timestamp(moment) == "2027-03-14T20:00:00.000500Z"
    assert format_timestamp(moment.replace(microsecond=0)) == "2027-03-14T20:00:00Z"


BAD_CURSORS = {
    # The two cursors of issue 6 verbatim: an offset with no UTC equivalent, and [1, "x"].
    "no UTC equivalent": "WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzAxOjAwIiwgIjAwMDAwMDAwLTAwMDAtNDAwMC04MDAw"
                         "LTAwMDAwMDAwMDAwMCJd",
    "number and text": "WzEsICJ4Il0",
    "deeply nested": b64(b"[" * 5000 + b"]" * 5000),
    "nested within the length bound": b64(b"[" * 70 + b"]" * 70),
    "not a list": b64({"startsAt": "2027-01-01T00:00:00Z", "id": ID}),
    "three items": b64(["2027-01-01T00:00:00Z", ID, "x"]),
    "wrong types": b64([1700000000, ID]),
    "id not a string": b64(["2027-01-01T00:00:00Z", 7]),
    "too long": b64(["2027-01-01T00:00:00Z", ID + "x" * MAX_CURSOR_CHARS]),
    "non-UTC offset": b64(["2027-01-01T00:00:00+01:00", ID]),
    "year before 1970": b64(["1969-12-31T23:59:59Z", ID]),
    "year 0001": b64(["0001-01-01T00:00:00Z", ID]),
    "not a day": b64(["2027-02-30T00:00:00Z", ID]),
    "zero fraction (not canonical)": b64(["2027-01-01T00:00:00.000000Z", ID]),
    "short fraction (not canonical)": b64(["2027-01-01T00:00:00.5Z", ID]),
    "unicode digits": b64([FULLWIDTH_2027 + "-01-01T00:00:00Z", ID]),
    "upper-case uuid": b64(["2027-01-01T00:00:00Z", "ABCDEF00-0000-4000-8000-00000000000A"]),
    "uuid without hyphens": b64(["2027-01-01T00:00:00Z", ID.replace("-", "")]),
    "not base64": "!!!",
    "bad base64 length": "x",
    "not json": b64(b"\xff\xfe"),
}


@pytest.mark.parametrize("raw", list(BAD_CURSORS.values()), ids=list(BAD_CURSORS))
def test_bad_cursors_are_400_problems(raw: str) -> None:
    with pytest.raises(Problem) as caught:
        decode_cursor(raw)
    assert caught.value.status == 400 and caught.value.type == "invalid-cursor"


@pytest.mark.parametrize("raw", ["\u00b2", "\u0661\u0660", "1_0", " 10", "10 ", "+10", "-1", "0", "201",
                                 "00001"])
def test_limit_takes_ascii_digits_only(raw: str) -> None:
    with pytest.raises(Problem) as caught:
        parse_limit(raw)
    assert caught.value.status == 400


def test_limit_in_range() -> None:
    assert parse_limit("7") == 7 and parse_limit("0200") == 200 and parse_limit(None) == 50


def test_uuid_takes_ascii_hex_only() -> None:
    assert parse_uuid(ID) == uuid.UUID(ID)
    assert parse_uuid(ARABIC_INDIC_ZERO * 8 + ID[8:]) is None  # int() would take Arabic-Indic digits
    assert parse_uuid("0000_000" + ID[8:]) is None  # and underscores


@pytest.mark.parametrize("raw", [
    b"[" * 6000 + b"]" * 6000,
    b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1),
    b'{"quantity": ' + b"9" * 5000 + b"}",
    b'{"quantity": 1e999}',
    b'{"quantity": -1e999}',
    b'{"quantity": 0.' + b"1" * 5000 + b"}",
    b'{"quantity": NaN}',
    b'{"quantity": Infinity}',
    b'{"quantity": -Infinity}',
    b'{"eventId": ',
    b"\xff\xfe\xfd",
])
def test_hostile_json_is_a_400_without_parser_text(raw: bytes) -> None:
    with pytest.raises(Problem) as caught:
        parse_json(raw)
    problem = caught.value
    assert problem.status == 400 and problem.type == "malformed-json"
    assert "Expecting" not in problem.detail and "char " not in problem.detail


def test_json_depth_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(at_limit) is not None
    in_strings = json.dumps({"name": "[" * 1000 + '\\"{' * 100, "n": [[1]]}).encode()
    assert parse_json(in_strings)["n"] == [[1]]
    assert parse_json(b'{"quantity": 3, "price": 1.5}') == {"quantity": 3, "price": 1.5}


def test_malformed_json_detail_gives_the_position() -> None:
    with pytest.raises(Problem) as caught:
        parse_json(b'{"eventId": ')
    assert "line 1, column 13" in caught.value.detail


def spec(**change: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "Show", "venue": "Hall", "startsAt": "2027-01-01T20:00:00Z",
                            "tiers": [{"name": "GA", "priceCents": 100, "capacity": 10}]}
    body.update(change)
    return body


@pytest.mark.parametrize("body,field", [
    (spec(startsAt="0001-01-01T00:00:00+01:00"), "startsAt"),
    (spec(startsAt="9999-12-31T23:59:59-05:00"), "startsAt"),
    (spec(startsAt="1969-12-31T23:59:59Z"), "startsAt"),
    (spec(startsAt=FULLWIDTH_2027 + "-01-01T20:00:00Z"), "startsAt"),
    (spec(startsAt=1700000000), "startsAt"),
    (spec(name="Nul\x00name"), "name"),
    (spec(venue="Bell\x07Hall"), "venue"),
    (spec(name="lone \ud800 surrogate"), "name"),
    (spec(tiers=[{"name": "G\x00A", "priceCents": 1, "capacity": 1}]), "tiers[0].name"),
    (spec(tiers=[{"name": "GA", "priceCents": 1, "capacity": True}]), "tiers[0].capacity"),
])
def test_bad_event_specs(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Problem) as caught:
        parse_event_spec(body)
    assert caught.value.status == 400
    assert [e["field"] for e in caught.value.extra["errors"]] == [field]


def test_event_start_is_kept_in_utc_with_its_fraction() -> None:
    assert parse_event_spec(spec(startsAt="2027-01-01T20:00:00.25+02:00")).starts_at == (
        "2027-01-01T18:00:00.250000Z")
    assert parse_event_spec(spec(startsAt="9999-12-31T23:59:59Z")).starts_at == "9999-12-31T23:59:59Z"


@pytest.mark.parametrize("status,exc,slug", [
    (400, LineTooLong("Request header", 8190, "9000"), "line-too-long"),
    (400, BadHttpMethod("G@T"), "invalid-method"),
    (400, BadHttpMessage("Invalid character in chunk size: 'zz'"), "bad-http-request"),
    (400, None, "bad-http-request"),
    (500, RuntimeError("secret at 10.0.0.5:5432"), "internal"),
])
def test_protocol_errors_are_problems_without_their_text(
        status: int, exc: BaseException | None, slug: str) -> None:
    problem = protocol_problem(status, exc)
    assert problem.status == status and problem.type == slug
    if exc is not None:
        assert str(exc) not in problem.detail and "zz" not in problem.detail
