"""The operator surface for events (issue 10): `POST|GET /admin/events` on every gateway
and `boxoffice event create|list`, which run the same code (event_ops/).

Against a cluster of its own: regions east and west, shards shard-a and shard-b homed
in east and shard-c in west, so the default placement policy (the shard homed nearest
the venue's region, least loaded first) has a choice to make within a region.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from deploy.cluster import Cluster
from event_ops.create import choose_shard
from region_map import ConsulMapStore, NotFound, Region, RegionMap, Shard, ShardMember
from tests.conftest import ADMIN_TOKEN, SMALL_TOPOLOGY, own_cluster
from tests.support import event_rows_on_primaries
from tests.support import gateway_url as gw

HOMES = {"shard-a": "east", "shard-b": "east", "shard-c": "west"}
TOPOLOGY = {**SMALL_TOPOLOGY, "name": "test-events-3",
            "shards": {name: {"home": home, "sync": "off"} for name, home in HOMES.items()}}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "events-admin", TOPOLOGY) as c:
        yield c


def spec(**change: Any) -> dict[str, Any]:
    """A valid create request with a fresh id and name; `change` replaces fields."""
    event_id = str(uuid.uuid4())
    body: dict[str, Any] = {
        "id": event_id, "name": f"Admin test {event_id[:8]}", "venue": "Hall",
        "startsAt": "2027-11-01T20:00:00Z", "currency": "EUR",
        "tiers": [{"name": "GA", "priceCents": 4500, "capacity": 20},
                  {"name": "VIP", "priceCents": 9000, "capacity": 5}],
    }
    body.update(change)
    return body


async def post(s: aiohttp.ClientSession, url: str, body: Any, headers: Mapping[str, str] = AUTH,
               ) -> tuple[int, str, dict[str, Any]]:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, (bytes, str)) else {"json": body}
    if isinstance(body, (bytes, str)):
        headers = {**headers, "Content-Type": "application/json"}
    async with s.post(f"{url}/admin/events", headers=headers, **kwargs) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


async def store_of(cluster: Cluster) -> ConsulMapStore:
    assert cluster.consul is not None
    return ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix)


async def load_map(cluster: Cluster) -> RegionMap:
    store = await store_of(cluster)
    try:
        return await store.load()
    finally:
        await store.close()


async def written(cluster: Cluster) -> dict[str, Any]:
    """Everything a creation could write: events and tiers in every database of every
    shard (primaries and replicas), and the map's placements."""
    rows = {}
    for (shard, copy), db in sorted(cluster.databases.items()):
        conn = await asyncpg.connect(db.dsn)
        try:
            rows[f"{shard}@{copy}"] = tuple(await conn.fetchrow(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM ticket_tiers)"))
        finally:
            await conn.close()
    return {"rows": rows, "placements": dict((await load_map(cluster)).placements)}


async def held_by(cluster: Cluster, event_id: str) -> dict[str, int]:
    """Rows of the event (and its tiers) on each shard's primary."""
    return await event_rows_on_primaries(cluster, event_id, HOMES)


def loads(region_map: RegionMap) -> Counter[str]:
    return Counter({name: 0 for name in HOMES}) + Counter(region_map.placements.values())


def least_loaded(region_map: RegionMap, among: list[str]) -> str:
    counts = loads(region_map)
    return min(among, key=lambda n: (counts[n], n))


# -- operator auth ------------------------------------------------------------------

AUTH_CASES = {
    "no header": ({}, 401),
    "empty header": ({"Authorization": ""}, 401),
    "bearer without a token": ({"Authorization": "Bearer "}, 401),
    "another scheme": ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
    "wrong token": ({"Authorization": "Bearer wrong"}, 403),
    "forged: the token and more": ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 403),
    "forged: a prefix of the token": ({"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, 403),
    "overlong token": ({"Authorization": "Bearer " + "t" * 7000}, 403),
}


@pytest.mark.parametrize("case", sorted(AUTH_CASES))
async def test_admin_events_need_the_operator_token(cluster: Cluster, case: str) -> None:
    headers, expected = AUTH_CASES[case]
    before = await written(cluster)
    async with aiohttp.ClientSession() as s:
        status, content_type, doc = await post(s, gw(cluster, "east"), spec(), headers)
        assert (status, content_type) == (expected, "application/problem+json"), doc
        async with s.get(f"{gw(cluster, 'west')}/admin/events", headers=headers) as resp:
            listed = await resp.json(content_type=None)
            assert (resp.status, resp.content_type) == (expected, "application/problem+json"), listed
    for answer in (doc, listed):
        assert answer["status"] == expected and ADMIN_TOKEN not in json.dumps(answer)
    assert await written(cluster) == before


async def test_a_header_over_the_servers_limit_is_refused_and_writes_nothing(cluster: Cluster) -> None:
    before = await written(cluster)
    async with aiohttp.ClientSession() as s:
        status, content_type, doc = await post(
            s, gw(cluster, "east"), spec(), {"Authorization": "Bearer " + "t" * 20_000})
    assert 400 <= status < 500 and content_type == "application/problem+json", doc
    assert await written(cluster) == before


# -- bad requests: a 4xx problem and nothing written anywhere -------------------------

GA = {"name": "GA", "priceCents": 4500, "capacity": 20}
BAD_REQUESTS: dict[str, tuple[Any, str | None]] = {
    # name: (the request, or a change to a valid one; the field errors[] names)
    "no tiers": ({"tiers": None}, "tiers"),
    "an empty tier list": ({"tiers": []}, "tiers"),
    "negative capacity": ({"tiers": [{**GA, "capacity": -1}]}, "tiers[0].capacity"),
    "negative price": ({"tiers": [{**GA, "priceCents": -5}]}, "tiers[0].priceCents"),
    "duplicate tier names": ({"tiers": [GA, {**GA, "capacity": 3}]}, "tiers[1].name"),
    "unknown shard": ({"shard": "shard-z"}, "shard"),
    "a shard that is not a name": ({"shard": 3}, "shard"),
    "unknown venueRegion": ({"venueRegion": "mars"}, "venueRegion"),
    "venueRegion of the wrong type": ({"venueRegion": ["east"]}, "venueRegion"),
    "capacity over the maximum": ({"tiers": [{**GA, "capacity": 10**7}]}, "tiers[0].capacity"),
    "a price over the maximum": ({"tiers": [{**GA, "priceCents": 10**12}]}, "tiers[0].priceCents"),
    "a 40-digit capacity": (b'{"name": "X", "venue": "Y", "startsAt": "2027-01-01T00:00:00Z",'
                            b' "tiers": [{"name": "GA", "priceCents": 1, "capacity": '
                            + b"9" * 40 + b"}]}", None),
    "capacity as a string": ({"tiers": [{**GA, "capacity": "20"}]}, "tiers[0].capacity"),
    "capacity as true": ({"tiers": [{**GA, "capacity": True}]}, "tiers[0].capacity"),
    "capacity as a float": ({"tiers": [{**GA, "capacity": 2.5}]}, "tiers[0].capacity"),
    "tiers as an object": ({"tiers": {"GA": GA}}, "tiers"),
    "a tier that is a string": ({"tiers": ["GA"]}, "tiers[0]"),
    "a name that is a number": ({"name": 5}, "name"),
    "no startsAt": ({"startsAt": None}, "startsAt"),
    "an id that is not a UUID": ({"id": "event-1"}, "id"),
    "a body that is a list": (b"[]", None),
    "malformed JSON": (b'{"name": ', None),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
async def test_a_bad_request_is_a_4xx_problem_and_writes_nothing(cluster: Cluster, case: str) -> None:
    change, field = BAD_REQUESTS[case]
    body = change if isinstance(change, bytes) else {
        k: v for k, v in {**spec(), **change}.items() if v is not None}
    before = await written(cluster)
    async with aiohttp.ClientSession() as s:
        status, content_type, doc = await post(s, gw(cluster, "west"), body)
    assert 400 <= status < 500 and content_type == "application/problem+json", doc
    assert {"type", "title", "status", "detail"} <= set(doc) and doc["status"] == status
    if field is not None:
        assert [e["field"] for e in doc["errors"]] == [field], doc
    assert "127.0.0.1" not in json.dumps(doc)
    assert await written(cluster) == before


# -- the default placement policy -------------------------------------------------------

def test_choose_shard_prefers_the_nearest_region_then_the_least_loaded() -> None:
    """Pure policy: regions north (no shard), east, west; north is 10 ms from east and
    30 ms from west. Every decision is (distance of the shard's primary, load, name)."""

    def shard(name: str, home: str) -> Shard:
        return Shard(name, 1, home, {home: ShardMember(home, f"http://{home}.invalid/shards/{name}",
                                                       f"{home}.invalid:5432")})

    regions = {"north": Region("north", "http://n.invalid", "N", {"east": 10, "west": 30}),
               "east": Region("east", "http://e.invalid", "E", {"north": 10, "west": 20}),
               "west": Region("west", "http://w.invalid", "W", {"north": 30, "east": 20})}
    shards = {"s1": shard("s1", "east"), "s2": shard("s2", "east"), "s3": shard("s3", "west")}

    def placed(s1: int, s2: int, s3: int) -> RegionMap:
        names = ["s1"] * s1 + ["s2"] * s2 + ["s3"] * s3
        return RegionMap(regions, shards, {str(uuid.uuid4()): n for n in names})

    assert choose_shard(placed(3, 1, 0), "east").shard == "s2"  # nearest, then least loaded
    assert choose_shard(placed(1, 3, 0), "east").shard == "s1"
    assert choose_shard(placed(2, 2, 0), "east").shard == "s1"  # a tie: by name
    assert choose_shard(placed(3, 1, 0), "north").shard == "s2"  # no shard there: the next nearest
    assert choose_shard(placed(0, 0, 9), "west").shard == "s3"  # nearness before load
    assert choose_shard(placed(3, 1, 2), None).shard == "s2"  # no venue: least loaded overall
    choice = choose_shard(placed(3, 1, 0), "north")
    assert (choice.reason, choice.placed_events) == ("nearest to north", 1)


async def test_the_default_is_the_least_loaded_shard_homed_nearest_the_venue(cluster: Cluster) -> None:
    """East's gateway places an event with no venue region in east (its own region), on
    the less loaded of shard-a and shard-b, even when shard-c (west) is less loaded; a
    venueRegion overrides the gateway's region."""
    east_shards = ["shard-a", "shard-b"]
    async with aiohttp.ClientSession() as s:
        counts = loads(await load_map(cluster))
        for name in east_shards:  # both more loaded than shard-c: nearness must beat load
            for _ in range(counts["shard-c"] - counts[name] + 1):
                status, _, doc = await post(s, gw(cluster, "east"), spec(shard=name))
                assert status == 201, doc
        for heavier in east_shards:  # make each east shard the more loaded one in turn
            lighter = next(n for n in east_shards if n != heavier)
            counts = loads(await load_map(cluster))
            for _ in range(counts[lighter] - counts[heavier] + 1):
                status, _, doc = await post(s, gw(cluster, "east"), spec(shard=heavier))
                assert status == 201 and doc["shard"] == heavier, doc
            before = await load_map(cluster)
            assert loads(before)[heavier] > loads(before)[lighter] > loads(before)["shard-c"]
            status, _, doc = await post(s, gw(cluster, "east"), spec())
            assert status == 201 and doc["shard"] == lighter, doc
            assert doc["homeRegion"] == "east"
        # West's gateway: its own region's shard-c; with venueRegion east, an east shard.
        status, _, doc = await post(s, gw(cluster, "west"), spec())
        assert status == 201 and doc["shard"] == "shard-c", doc
        before = await load_map(cluster)
        status, _, doc = await post(s, gw(cluster, "west"), spec(venueRegion="east"))
        assert status == 201 and doc["shard"] == least_loaded(before, east_shards), doc
        assert await held_by(cluster, doc["id"]) == {
            n: (3 if n == doc["shard"] else 0) for n in HOMES}  # the event and its 2 tiers


# -- concurrent creations of one spec ------------------------------------------------------

async def test_16_concurrent_creations_of_one_spec_create_one_event(cluster: Cluster) -> None:
    body = spec()
    event_id = body["id"]
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*(
            post(s, gw(cluster, ("east", "west")[n % 2]), body) for n in range(16)))
    statuses = Counter(status for status, _, _ in answers)
    assert statuses == {201: 1, 409: 15}, answers
    for status, _, doc in answers:
        if status == 409:
            assert doc["eventId"] == event_id and event_id in doc["detail"], doc
    (created,) = (doc for status, _, doc in answers if status == 201)
    region_map = await load_map(cluster)
    assert region_map.placements[event_id] == created["shard"]
    assert sum(1 for e in region_map.placements if e == event_id) == 1
    assert await held_by(cluster, event_id) == {n: (3 if n == created["shard"] else 0) for n in HOMES}


# -- listing ----------------------------------------------------------------------------------

async def test_the_listing_joins_what_primaries_hold_with_the_placements(cluster: Cluster) -> None:
    """Four kinds of event on shard-a and shard-b: created normally (placed), held by
    shard-b but placed on shard-a (placed elsewhere there, missing on shard-a), held by
    shard-a and placed nowhere (a half-created event), placed on shard-a and held by no
    shard (missing)."""
    region_map = await load_map(cluster)
    store = await store_of(cluster)
    stray_placed, stray_held, only_placed = (str(uuid.uuid4()) for _ in range(3))
    try:
        async with aiohttp.ClientSession() as s:
            status, _, normal = await post(s, gw(cluster, "east"), spec(shard="shard-a"))
            assert status == 201, normal
            for shard, body in (("shard-b", spec(id=stray_placed)), ("shard-a", spec(id=stray_held))):
                url = region_map.shards[shard].primary.service_url
                async with s.post(f"{url}/admin/events", json=body, headers=AUTH) as resp:
                    assert resp.status == 201, await resp.text()
            await store.place_event(stray_placed, "shard-a", 0)
            await store.place_event(only_placed, "shard-a", 0)
            async with s.get(f"{gw(cluster, 'west')}/admin/events", headers=AUTH) as resp:
                assert resp.status == 200
                listing = await resp.json()
            async with s.get(f"{gw(cluster, 'west')}/admin/events?shard=shard-b", headers=AUTH) as resp:
                assert resp.status == 200
                only_b = await resp.json()
            async with s.get(f"{gw(cluster, 'west')}/admin/events?shard=shard-q", headers=AUTH) as resp:
                assert resp.status == 400 and resp.content_type == "application/problem+json"
        by_shard = {sh["shard"]: {e["id"]: e for e in sh["events"]} for sh in listing["shards"]}
        assert sorted(by_shard) == sorted(HOMES)
        assert all(sh["unreadable"] is None for sh in listing["shards"])
        a, b = by_shard["shard-a"], by_shard["shard-b"]
        assert (a[normal["id"]]["status"], a[normal["id"]]["name"]) == ("placed", normal["name"])
        assert (b[stray_placed]["status"], b[stray_placed]["placedOn"]) == ("placed-elsewhere", "shard-a")
        assert (a[stray_placed]["status"], a[stray_placed]["name"]) == ("missing", None)
        assert (a[stray_held]["status"], a[stray_held]["placedOn"]) == ("not-placed", None)
        assert a[only_placed]["status"] == "missing" and only_placed not in b
        # Every placement appears under its shard; every event a primary holds under it.
        current = await load_map(cluster)
        for shard in HOMES:
            placed_here = {e for e, sh in current.placements.items() if sh == shard}
            assert placed_here == {e for e, d in by_shard[shard].items()
                                   if d["status"] in ("placed", "missing")}
        assert [sh["shard"] for sh in only_b["shards"]] == ["shard-b"]
        assert {e["id"]: e for e in only_b["shards"][0]["events"]} == b
    finally:
        for event_id in (stray_placed, only_placed):
            try:
                _, index = await store.read_placement(event_id)
                await store.unplace_event(event_id, index)
            except NotFound:
                pass
        await store.close()


# -- the CLI ------------------------------------------------------------------------------------

def boxoffice(cluster: Cluster, tmp_path: Path, *args: str, stdin: str | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """`boxoffice ...` as an operator runs it: a process of its own, Consul's address and
    the operator token from its flags and environment (no state directory)."""
    assert cluster.consul is not None
    env = {**os.environ, "BOXOFFICE_ADMIN_TOKEN": ADMIN_TOKEN}
    command = [sys.executable, "-m", "deploy.cli", "--state-dir", str(tmp_path / "no-state"),
               *args, "--consul", cluster.consul.address]
    return subprocess.run(command, cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
                          timeout=60)


async def test_the_cli_creates_from_a_spec_file_or_flags_and_lists(cluster: Cluster,
                                                                   tmp_path: Path) -> None:
    body = spec(venueRegion="west")
    (tmp_path / "event.json").write_text(json.dumps(body))
    done = await asyncio.to_thread(boxoffice, cluster, tmp_path, "event", "create",
                                   str(tmp_path / "event.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"created event {body['id']}" in done.stdout and "on shard-c" in done.stdout
    assert "nearest to west" in done.stdout
    assert await held_by(cluster, body["id"]) == {"shard-a": 0, "shard-b": 0, "shard-c": 3}

    # Flags, no venue region: the least loaded shard overall.
    event_id = str(uuid.uuid4())
    before = await load_map(cluster)
    done = await asyncio.to_thread(
        boxoffice, cluster, tmp_path, "event", "create", "--id", event_id, "--name", "CLI Night",
        "--venue", "Arena", "--starts-at", "2028-02-01T19:30:00+01:00", "--currency", "USD",
        "--tier", "Floor: standing:2500:100", "--tier", "Seat:4000:50", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    created = json.loads(done.stdout)
    assert created["id"] == event_id and created["startsAt"] == "2028-02-01T18:30:00Z"
    assert created["shard"] == least_loaded(before, list(HOMES))
    assert [(t["name"], t["priceCents"], t["capacity"]) for t in created["tiers"]] == [
        ("Floor: standing", 2500, 100), ("Seat", 4000, 50)]
    assert (await load_map(cluster)).placements[event_id] == created["shard"]

    # The same again: refused (exit 1), naming the event; nothing else written.
    again = await asyncio.to_thread(
        boxoffice, cluster, tmp_path, "event", "create", "--id", event_id, "--name", "CLI Night",
        "--venue", "Arena", "--starts-at", "2028-02-01T19:30:00+01:00", "--tier", "Seat:4000:50")
    assert again.returncode == 1 and "refused (event-exists)" in again.stdout, again.stdout
    # A bad spec from stdin: refused with the field, nothing written.
    state = await written(cluster)
    bad = await asyncio.to_thread(boxoffice, cluster, tmp_path, "event", "create", "-",
                                  stdin=json.dumps(spec(tiers=[{**GA, "capacity": -3}])))
    assert bad.returncode == 1 and "tiers[0].capacity" in bad.stdout, bad.stdout
    unknown = await asyncio.to_thread(boxoffice, cluster, tmp_path, "event", "create", "-",
                                      "--venue-region", "mars", stdin=json.dumps(spec()))
    assert unknown.returncode == 1 and "venueRegion" in unknown.stdout, unknown.stdout
    assert await written(cluster) == state

    # The listing, as a table and as JSON.
    table = await asyncio.to_thread(boxoffice, cluster, tmp_path, "event", "list")
    assert table.returncode == 0, table.stdout + table.stderr
    lines = table.stdout.splitlines()
    assert any(event_id in line and "placed" in line and "CLI Night" in line for line in lines)
    assert [line.split()[0] for line in lines if line.startswith("shard-")] == sorted(HOMES)
    listed = await asyncio.to_thread(boxoffice, cluster, tmp_path, "event", "list",
                                     "--shard", created["shard"], "--json")
    assert listed.returncode == 0, listed.stderr
    (only,) = json.loads(listed.stdout)["shards"]
    assert only["shard"] == created["shard"]
    assert {e["id"]: e["status"] for e in only["events"]}[event_id] == "placed"
    nowhere = await asyncio.to_thread(boxoffice, cluster, tmp_path, "event", "list", "--shard", "zz")
    assert nowhere.returncode == 1 and "Unknown shard" in nowhere.stdout
