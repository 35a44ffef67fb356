"""Unit tests of pure logic: no servers."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from common.cursor import decode_cursor, encode_cursor
from common.ids import new_booking_id, routing_prefix
from common.lsn import int_to_lsn, lsn_to_int
from common.problems import Problem
from gateway.consistency import ConsistencyToken
from gateway.routing import ClientRule, client_region
from gateway.upstream import CircuitBreaker
from region_map import Shard, ShardMember
from shard_service.roles import DatabaseState, Role, derive_role, read_refusal


def test_booking_id_carries_its_event_prefix_and_is_random() -> None:
    event = uuid.uuid4()
    ids = {new_booking_id(event) for _ in range(1000)}
    assert len(ids) == 1000
    for booking in ids:
        assert routing_prefix(booking) == routing_prefix(event)
        assert booking.variant == uuid.RFC_4122


def test_lsn_round_trip_and_order() -> None:
    assert lsn_to_int("0/3000060") == 0x3000060
    assert lsn_to_int("1/0") == 1 << 32
    assert int_to_lsn(lsn_to_int("A/FF00")) == "A/FF00"
    assert lsn_to_int("1/0") > lsn_to_int("0/FFFFFFFF")


@pytest.mark.parametrize("bad", ["", "1", "-1/0", " 1/0", "1/0 ", "0x1/0", "1/G", "123456789/0", "1/0/0"])
def test_a_malformed_lsn_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        lsn_to_int(bad)


SECRET = b"test-secret"


def signed(positions: dict[str, int], secret: bytes = SECRET) -> str:
    return ConsistencyToken(dict(positions)).serialize(secret)


def test_token_keeps_the_highest_position_per_shard() -> None:
    token = ConsistencyToken.parse(signed({"shard-1": 0x100, "shard-2": 0x50}), SECRET)
    token.advance("shard-1", 0x80)  # older: ignored
    token.advance("shard-2", 0x60)
    assert token.position("shard-1") == "0/100"
    assert token.position("shard-2") == "0/60"
    assert ConsistencyToken.parse(token.serialize(SECRET), SECRET).positions == token.positions


def test_token_merge_of_cookie_and_header() -> None:
    a = ConsistencyToken.parse(signed({"s1": 0x10, "s2": 0x90}), SECRET)
    b = ConsistencyToken.parse(signed({"s1": 0x20}), SECRET)
    merged = a.merge(b)
    assert merged.position("s1") == "0/20" and merged.position("s2") == "0/90"


def test_a_token_is_only_accepted_with_its_secret_and_unchanged() -> None:
    good = signed({"shard-1": 0x3000060})
    assert ConsistencyToken.parse(good, SECRET).position("shard-1") == "0/3000060"
    assert not ConsistencyToken.parse(good, b"another gateway's secret")
    version, mac, positions = good.split(":")
    forged = f"{version}:{mac}:{positions.replace('3000060', 'FFFFFFFF')}"  # pushed forward
    assert not ConsistencyToken.parse(forged, SECRET)
    assert not ConsistencyToken.parse(f"{version}:{mac[:-1]}A:{positions}", SECRET)


@pytest.mark.parametrize("raw", [
    "", "garbage", "s1=0/100", "shard-2=FFFFFFFF/FFFFFFFF",  # unsigned (the old format)
    "v1::s1=0/1", "v1:AAAA:s1=0/1", "v2:x:s1=0/1", "v1:" + "A" * 5000,
])
def test_malformed_or_unsigned_tokens_are_ignored_not_errors(raw: str) -> None:
    assert not ConsistencyToken.parse(raw, SECRET)


def test_a_signed_token_with_a_bad_entry_is_ignored_whole() -> None:
    from gateway.consistency import _mac

    for positions in ("s1=zz/1", "s1=0/1;drop", "=0/1", "s1=0/123456789", "s1=0/1." * 65 + "s1=0/1"):
        assert not ConsistencyToken.parse(f"v1:{_mac(SECRET, positions, 'v1')}:{positions}", SECRET)
    for positions in ("s1=0/1", "s1=0/1@", "s1=0/1@-1", "s1=0/1@01", "s1=0/1@1@2", "s1=0/1@x",
                      "s1=0/1@99999999999999999999", "s1=0/1@9223372036854775808", "s1=0/1@+1"):
        assert not ConsistencyToken.parse(f"v2:{_mac(SECRET, positions)}:{positions}", SECRET)


# Issue 16, class 5: an LSN names no history; the token carries the epoch beside it.
def test_a_token_carries_the_epoch_of_each_entry() -> None:
    token = ConsistencyToken()
    token.advance("s1", 0x3000060, 4)
    raw = token.serialize(SECRET)
    assert raw.startswith("v2:") and raw.endswith(":s1=0/3000060@4")
    parsed = ConsistencyToken.parse(raw, SECRET)
    assert (parsed.position("s1"), parsed.epoch("s1")) == ("0/3000060", 4)
    version, mac, positions = raw.split(":")
    # The epoch is signed: lowering it (to make an old primary's copy qualify) voids the token.
    assert not ConsistencyToken.parse(f"{version}:{mac}:{positions.replace('@4', '@3')}", SECRET)


def test_a_later_epoch_wins_whatever_its_lsn() -> None:
    """The old primary ran on past the fork with higher LSNs than the new primary's:
    an entry of a later epoch replaces one of an earlier epoch even when its LSN is lower,
    and an earlier epoch never replaces a later one."""
    token = ConsistencyToken()
    token.advance("s1", 0x9000000, 1)  # the old primary, epoch 1
    token.advance("s1", 0x3000060, 2)  # the new primary, epoch 2: a lower LSN
    assert (token.position("s1"), token.epoch("s1")) == ("0/3000060", 2)
    token.advance("s1", 0xA000000, 1)
    assert (token.position("s1"), token.epoch("s1")) == ("0/3000060", 2)
    other = ConsistencyToken()
    other.advance("s1", 0xFFFFFF, 1)
    other.advance("s2", 0x10, 3)
    merged = other.merge(token)
    assert (merged.position("s1"), merged.epoch("s1")) == ("0/3000060", 2)
    assert (merged.position("s2"), merged.epoch("s2")) == ("0/10", 3)


def test_a_v1_token_from_before_epochs_still_parses_with_epoch_zero() -> None:
    from gateway.consistency import _mac

    positions = "s1=0/3000060.s2=0/10"
    parsed = ConsistencyToken.parse(f"v1:{_mac(SECRET, positions, 'v1')}:{positions}", SECRET)
    assert parsed.position("s1") == "0/3000060" and parsed.epoch("s1") == 0
    assert parsed.position("s2") == "0/10"
    # A v1 MAC does not sign a v2 token, nor the reverse.
    assert not ConsistencyToken.parse(f"v2:{_mac(SECRET, positions, 'v1')}:{positions}", SECRET)
    assert not ConsistencyToken.parse(f"v1:{_mac(SECRET, positions + '@1')}:{positions}@1", SECRET)


@pytest.mark.parametrize("raw", [
    "v1:\xff\xfe:shard-1=0/1",  # what a client sends as Latin-1 bytes
    "v1:\udcff\udcfe:shard-1=0/1",  # the same bytes as aiohttp decodes them (surrogateescape)
    "v2:\udcff:shard-1=0/1@1", "v2:AAAA:shard-1=0/1@\u0661", "v2:AAAA:s\u00e9=0/1@1",
])
def test_a_token_with_non_ascii_bytes_is_ignored_never_an_error(raw: str) -> None:
    assert not ConsistencyToken.parse(raw, SECRET)


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


NOT_A_DATE_CURSOR = encode_cursor("not a date", "0ddba11c-0000-4000-8000-00000000dead")


@pytest.mark.parametrize("raw", ["x", "!!!", NOT_A_DATE_CURSOR])
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
    defaults = load_topology().gateway
    assert (defaults["cache_ttl_seconds"], defaults["write_retry_seconds"]) == (1.0, 10.0)
    assert defaults["write_attempt_seconds"] < defaults["write_retry_seconds"]
    assert defaults["booking_rate_per_second"] > 0 and defaults["max_in_flight_reads"] > 0
    assert parse_topology(base).gateway == {}
    assert parse_topology({**base, "gateway": {"write_retry_seconds": 12}}).gateway == {
        "write_retry_seconds": 12.0}
    for bad in ({"write_retry_seconds": 0}, {"write_retry_seconds": -1},
                {"cache_ttl_seconds": "soon"}, {"cache_ttl_seconds": True}, {"retries": 3}):
        with pytest.raises(TopologyError, match="gateway"):
            parse_topology({**base, "gateway": bad})


def test_topology_zone_fallbacks_are_nearest_first() -> None:
    """A `sync: zone` primary's set at start: its zone standby, then the other regions'
    copies nearest first (FIRST 1 waits for the first connected: losing the zone moves
    the wait to the nearest region), whatever order the regions are declared in."""
    from deploy.topology import load_topology, parse_topology

    default = load_topology()
    assert default.sync_standbys("shard-3") == ["ap-south/b", "eu-west", "us-east"]  # Mumbai
    assert default.sync_standbys("shard-1") == ["us-east/b", "eu-west", "ap-south"]
    t = parse_topology({"regions": {"a": {}, "b": {}, "c": {}}, "shards": {"s": {"home": "a"}},
                        "latency_ms": {"a/b": 80, "a/c": 20, "b/c": 50}})
    assert t.sync_standbys("s") == ["a/b", "c", "b"]


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


def test_only_a_copys_own_ill_health_counts_against_its_breaker() -> None:
    from gateway.upstream import signals_unhealthy

    problem = b'{"type": "https://boxoffice.example/problems/%s", "status": 503}'
    assert signals_unhealthy(503, problem % b"database-unavailable")
    assert signals_unhealthy(503, problem % b"not-ready")
    # One request's trouble says nothing about the copy's health:
    for kind in (b"replica-behind", b"deadline-exceeded", b"overloaded", b"read-only"):
        assert not signals_unhealthy(503, problem % kind)
    assert not signals_unhealthy(500, problem % b"internal")
    assert not signals_unhealthy(400, problem % b"invalid-cursor")


def test_the_booking_service_gets_a_deadline_inside_the_gateways_timeout() -> None:
    from common.deadlines import MAX_BUDGET_MS, MIN_BUDGET_MS, Deadline
    from gateway.writes import service_deadline_ms

    for attempt in (0.2, 1.0, 2.0, 5.0):
        ms = service_deadline_ms(attempt)
        assert 0 < ms < attempt * 1000
    assert service_deadline_ms(2.0) == 1500
    assert 0.9 < Deadline.from_header("1000").remaining() <= 1.0
    assert Deadline.from_header("0").remaining() <= MIN_BUDGET_MS / 1000
    assert Deadline.from_header("999999").remaining() <= MAX_BUDGET_MS / 1000
    for bad in (None, "", "-5", "1e3", "²", "12.5", "9" * 7):
        assert 9 < Deadline.from_header(bad).remaining() <= 10  # the default budget


# Issue 16, class 5: a copy serves reads only on the map's primary's history.
def _record(epoch: int = 3) -> Shard:
    return Shard("s", epoch, "r", {"r": ShardMember("r", "http://a", "h:1"),
                                   "r/b": ShardMember("r", "http://b", "h:2", zone="b")})


def test_an_old_primary_restarted_as_a_standby_serves_no_read() -> None:
    """Crashed at epoch 2, started again in recovery before its rewind (the new primary,
    epoch 3, did not answer): its epoch row is 2, so it is not a replica, and it refuses
    every read, with or without a token (its unconfirmed commits are visible there)."""
    view = derive_role(_record(3), "r/b", DatabaseState(True, 2))
    assert view.role is Role.FENCED and not view.consistent
    assert read_refusal(view) is not None and read_refusal(view, 3, token=True) is not None
    replica = derive_role(_record(3), "r/b", DatabaseState(True, 3))
    assert replica.role is Role.REPLICA
    assert read_refusal(replica) is None and read_refusal(replica, 3, token=True) is None
    assert read_refusal(replica, 2, token=True) is None  # epoch 2's writes are in epoch 3's history
    # A copy whose role check failed (a timeout under load) still serves anonymous reads,
    # but no read for a token: it cannot say which history it is on.
    unknown = derive_role(_record(3), "r/b", None)
    assert unknown.role is Role.UNKNOWN
    assert read_refusal(unknown) is None and read_refusal(unknown, 0, token=True) is not None


def test_a_copy_on_an_older_epoch_never_satisfies_a_token() -> None:
    """Whatever its LSN: a copy whose epoch row is behind the token entry's epoch refuses,
    even when its own map is behind too and it derives `primary` (an old primary whose
    booking service has not seen the promotion)."""
    stale_primary = derive_role(_record(2), "r", DatabaseState(False, 2))
    assert stale_primary.role is Role.PRIMARY  # by its stale map
    refusal = read_refusal(stale_primary, 3, token=True)
    assert refusal is not None and refusal[0] == "epoch-behind"
    assert read_refusal(stale_primary, 2, token=True) is None and read_refusal(stale_primary) is None
    no_row = derive_role(_record(2), "r/b", DatabaseState(True, None))
    assert read_refusal(no_row, 1, token=True) is not None
