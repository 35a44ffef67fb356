"""Unit tests of pure logic: no servers."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from common.cursor import decode_cursor, encode_cursor
from common.ids import new_booking_id, routing_prefix
from common.problems import Problem
from gateway.consistency import ConsistencyToken, int_to_lsn, lsn_to_int
from gateway.routing import ClientRule, client_region
from gateway.upstream import CircuitBreaker


def test_booking_id_carries_its_event_prefix_and_is_random() -> None:
    event = uuid.uuid4()
    ids = {new_booking_id(event) for _ in range(1000)}
    assert len(ids) == 1000
    for booking in ids:
        assert routing_prefix(booking) == routing_prefix(event)
        assert booking.variant == uuid.RFC_4122
        assert str(booking) != str(event)


def test_lsn_round_trip_and_order() -> None:
    assert lsn_to_int("0/3000060") == 0x3000060
    assert lsn_to_int("1/0") == 1 << 32
    assert int_to_lsn(lsn_to_int("A/FF00")) == "A/FF00"
    assert lsn_to_int("1/0") > lsn_to_int("0/FFFFFFFF")


def test_token_keeps_the_highest_position_per_shard() -> None:
    token = ConsistencyToken.parse("shard-1=0/100.shard-2=0/50")
    token.advance("shard-1", 0x80)  # older: ignored
    token.advance("shard-2", 0x60)
    assert token.position("shard-1") == "0/100"
    assert token.position("shard-2") == "0/60"
    assert ConsistencyToken.parse(token.serialize()).positions == token.positions


def test_token_merge_of_cookie_and_header() -> None:
    a = ConsistencyToken.parse("s1=0/10.s2=0/90")
    b = ConsistencyToken.parse("s1=0/20")
    merged = a.merge(b)
    assert merged.position("s1") == "0/20" and merged.position("s2") == "0/90"


@pytest.mark.parametrize("raw", ["", "garbage", "s1=zz/1", "s1=0/1;drop", "=0/1", "s1=0/123456789"])
def test_malformed_tokens_are_ignored_not_errors(raw: str) -> None:
    assert not ConsistencyToken.parse(raw)


RULES = [
    ClientRule(ipaddress.ip_network("10.0.0.0/8"), "us-east"),
    ClientRule(ipaddress.ip_network("10.20.0.0/16"), "eu-west"),
]
REGIONS = ["us-east", "eu-west", "ap-south"]


def test_client_region_longest_prefix_wins() -> None:
    assert client_region(None, "10.1.2.3", RULES, REGIONS, "ap-south") == "us-east"
    assert client_region(None, "10.20.2.3", RULES, REGIONS, "ap-south") == "eu-west"


def test_client_region_header_wins_when_known() -> None:
    assert client_region("ap-south", "10.20.2.3", RULES, REGIONS, "us-east") == "ap-south"
    assert client_region("mars", "10.20.2.3", RULES, REGIONS, "us-east") == "eu-west"


def test_client_region_defaults_to_the_gateway_region() -> None:
    assert client_region(None, "192.0.2.1", RULES, REGIONS, "ap-south") == "ap-south"
    assert client_region(None, "not-an-ip", RULES, REGIONS, "ap-south") == "ap-south"
    assert client_region(None, "::1", RULES, REGIONS, "ap-south") == "ap-south"


def test_cursor_round_trip() -> None:
    event = str(uuid.uuid4())
    cursor = decode_cursor(encode_cursor("2027-03-14T20:00:00Z", event))
    assert cursor is not None
    assert str(cursor.event_id) == event
    assert cursor.starts_at.isoformat() == "2027-03-14T20:00:00+00:00"


@pytest.mark.parametrize("raw", ["x", "!!!", encode_cursor("not a date", str(uuid.uuid4()))])
def test_bad_cursor_is_a_400_problem(raw: str) -> None:
    with pytest.raises(Problem) as info:
        decode_cursor(raw)
    assert info.value.status == 400


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_once_per_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown=2.0, clock=clock)
    for _ in range(2):
        breaker.failure()
    assert breaker.allow() and not breaker.open  # two failures: still closed
    breaker.success()
    for _ in range(3):
        breaker.failure()
    assert breaker.open and not breaker.allow()
    clock.now += 2.0
    assert breaker.allow()  # half-open: one probe goes through...
    assert not breaker.allow()  # ...and nobody else until it answers
    breaker.failure()  # the probe failed: open for another cool-down
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()
    breaker.success()  # the probe succeeded: closed for everyone
    assert breaker.allow() and breaker.allow() and not breaker.open


def test_topology_gateway_settings_are_checked() -> None:
    from deploy.topology import TopologyError, load_topology, parse_topology

    base = {"regions": {"r": {}}, "shards": {"s": {"home": "r"}}}
    assert load_topology().gateway == {"cache_ttl_seconds": 1.0, "write_retry_seconds": 5.0}
    assert parse_topology(base).gateway == {}
    assert parse_topology({**base, "gateway": {"write_retry_seconds": 12}}).gateway == {
        "write_retry_seconds": 12.0}
    for bad in ({"write_retry_seconds": 0}, {"write_retry_seconds": -1},
                {"cache_ttl_seconds": "soon"}, {"cache_ttl_seconds": True}, {"retries": 3}):
        with pytest.raises(TopologyError, match="gateway"):
            parse_topology({**base, "gateway": bad})


def test_read_order_tries_copies_failing_their_health_checks_last() -> None:
    from gateway.routing import read_order
    from region_map import Region, RegionMap, Shard, ShardMember

    regions = {
        "east": Region("east", "http://gw-east", "E", {"west": 30, "south": 90}),
        "west": Region("west", "http://gw-west", "W", {"east": 30, "south": 50}),
        "south": Region("south", "http://gw-south", "S", {"east": 90, "west": 50}),
    }
    members = {r: ShardMember(r, f"http://{r}:1/shards/s1", f"{r}:5432") for r in regions}
    shard = Shard("s1", 1, "west", members)
    region_map = RegionMap(regions, {"s1": shard}, {}, 1)

    def order(failing: set[str] | None) -> list[str]:
        predicate = None if failing is None else (lambda m: m.region in failing)
        return [m.region for m in read_order(region_map, shard, "east", predicate)]

    assert order(None) == ["east", "west", "south"]
    assert order(set()) == ["east", "west", "south"]
    assert order({"east"}) == ["west", "south", "east"]
    assert order({"east", "west"}) == ["south", "east", "west"]  # distance order within groups


def test_map_show_marks_each_copys_health() -> None:
    from deploy.cli import format_map
    from region_map import Region, RegionMap, Shard, ShardMember

    regions = {r: Region(r, f"http://gw-{r}", r.title()) for r in ("east", "west", "south")}
    members = {r: ShardMember(r, f"http://{r}:1/shards/s1", f"{r}:5432") for r in regions}
    region_map = RegionMap(regions, {"s1": Shard("s1", 3, "east", members)}, {"e1": "s1"}, 7)

    shown = format_map(region_map, {"http://east:1/shards/s1": True, "http://west:1/shards/s1": False})
    (row,) = [line for line in shown.splitlines() if line.startswith("s1 ")]
    assert row.split() == ["s1", "3", "east", "(ok)", "south", "(?),", "west", "(FAILING)"]
    assert "FAILING" not in format_map(region_map)  # without health: the regions alone
