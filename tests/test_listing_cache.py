"""The gateway's listing cache (issue 12): single flight, LRU, expiry, Cache-Control.

The pure logic against a fake clock; then one more gateway on the session's cluster
(tests/conftest.py `cluster`), with a long TTL so no entry expires while a test runs,
whose calls are counted at the booking services (their request metrics), not inside
the gateway.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.cursor import Cursor
from deploy.cluster import Cluster
from gateway.listing_cache import PRIVATE, Cached, ListingCache, cache_control
from tests.conftest import ADMIN_TOKEN, METRICS_AUTH
from tests.support import create_event_doc, extra_gateway


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """A fetch that counts its calls and finishes (or fails) when the test says so."""

    def __init__(self, body: bytes = b"page") -> None:
        self.body = body
        self.calls = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None
        self.cancelled = False

    async def __call__(self) -> bytes:
        self.calls += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail is not None:
            raise self.fail
        return self.body


async def settle() -> None:
    """Let every ready task run until all of them wait (no timing involved)."""
    for _ in range(10):
        await asyncio.sleep(0)


# -- pure logic ---------------------------------------------------------------------------

def test_least_recently_used_entries_are_evicted_first() -> None:
    cache = ListingCache(ttl=60, max_entries=3, clock=FakeClock())
    for key in "abc":
        cache.put(key, key.encode())
    assert cache.peek("a") is not None  # a is now the most recently used
    cache.put("d", b"d")
    assert cache.keys() == ["c", "a", "d"] and cache.peek("b") is None
    cache.put("c", b"c2")  # storing an existing key refreshes it, evicts nothing
    assert cache.keys() == ["a", "d", "c"] and cache.stats.evictions == 1
    cache.put("e", b"e")
    assert cache.keys() == ["d", "c", "e"] and cache.stats.evictions == 2
    assert [cache.peek(k).body for k in ("d", "c", "e")] == [b"d", b"c2", b"e"]  # type: ignore[union-attr]


def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    cache = ListingCache(ttl=2.0, clock=clock)
    entry = cache.put("k", b"v")
    assert entry.max_age(clock.now) == 2
    clock.now += 1.5
    assert cache.peek("k") == entry and entry.max_age(clock.now) == 0  # 0.5 s left: not a whole second
    clock.now += 0.5
    assert cache.peek("k") is None and len(cache) == 0  # dropped when seen


def test_cache_control() -> None:
    assert cache_control(personal=False, max_age=3) == "public, max-age=3"
    assert cache_control(personal=True, max_age=3) == PRIVATE == "private, no-store"
    assert Cached(b"", expires=10.0).max_age(12.0) == 0


async def test_concurrent_misses_share_one_fetch() -> None:
    cache = ListingCache(ttl=60, clock=FakeClock())
    fetch = Fetcher()
    waiters = [asyncio.ensure_future(cache.get("k", fetch)) for _ in range(50)]
    await settle()
    assert fetch.calls == 1 and not any(w.done() for w in waiters)
    fetch.release.set()
    entries = await asyncio.gather(*waiters)
    assert {e.body for e in entries} == {b"page"} and fetch.calls == 1
    assert (cache.stats.misses, cache.stats.shared) == (1, 49)
    assert (await cache.get("k", fetch)).body == b"page" and fetch.calls == 1  # a hit now
    assert cache.stats.hits == 1


async def test_a_failed_fetch_is_shared_once_and_not_cached() -> None:
    cache = ListingCache(ttl=60, clock=FakeClock())
    fetch = Fetcher()
    fetch.fail = RuntimeError("shard down")
    waiters = [asyncio.ensure_future(cache.get("k", fetch)) for _ in range(5)]
    await settle()
    fetch.release.set()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes) and fetch.calls == 1
    assert len(cache) == 0 and cache.stats.failures == 1
    fetch.fail = None  # the next miss fetches again, and succeeds
    assert (await cache.get("k", fetch)).body == b"page" and fetch.calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    cache = ListingCache(ttl=60, clock=FakeClock())
    fetch = Fetcher()
    first = asyncio.ensure_future(cache.get("k", fetch))  # it started the fetch
    second = asyncio.ensure_future(cache.get("k", fetch))
    await settle()
    first.cancel()
    await settle()
    assert first.cancelled() and not fetch.cancelled
    fetch.release.set()
    assert (await second).body == b"page" and fetch.calls == 1

    # Every waiter gone: the fetch still finishes and its page is cached.
    lone = asyncio.ensure_future(cache.get("j", fetch2 := Fetcher(b"other")))
    await settle()
    lone.cancel()
    fetch2.release.set()
    await settle()
    assert not fetch2.cancelled and cache.peek("j") is not None


async def test_a_ttl_of_zero_turns_the_cache_off() -> None:
    cache = ListingCache(ttl=0, clock=FakeClock())
    fetch = Fetcher()
    fetch.release.set()
    await asyncio.gather(*(cache.get("k", fetch) for _ in range(3)))
    assert fetch.calls == 3 and len(cache) == 0


# -- against real gateways and booking services ---------------------------------------------

LISTING_ROUTE = re.compile(r"^/shards/(?P<shard>[^/]+)/api/events$")


@pytest.fixture(scope="module")
def cached_gateway(cluster: Cluster) -> Iterator[str]:
    """One more east gateway on the session's cluster, with a long cache TTL (no entry
    expires while a test runs: every second fetch is a defect); its URL."""
    with extra_gateway(cluster, "east", "cached", {"--cache-ttl": "600"}) as url:
        yield url


async def listing_calls(s: aiohttp.ClientSession, cluster: Cluster) -> Counter[str]:
    """`GET .../api/events` requests answered so far, per shard, by every booking service
    (their request-latency histograms count each one)."""
    assert cluster.plan is not None
    calls: Counter[str] = Counter()
    for port in cluster.plan.service_metrics_ports.values():
        async with s.get(f"http://127.0.0.1:{port}/metrics", headers=METRICS_AUTH) as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name != "boxoffice_http_request_seconds_count":
                    continue
                route = LISTING_ROUTE.match(sample.labels.get("route", ""))
                if route and sample.labels.get("method") == "GET":
                    calls[route["shard"]] += int(sample.value)
    return calls


def fresh_position() -> datetime:
    """A time no test asked for before (so a page from it is a miss), before the events
    tests create (their dates are later)."""
    return datetime(1971, 1, 1, tzinfo=UTC) + timedelta(seconds=random.randrange(10**8))


def cursor_at(starts_at: datetime) -> str:
    return Cursor(starts_at, uuid.uuid4()).encode()


async def get_page(s: aiohttp.ClientSession, url: str, cursor: str, headers: dict[str, str] | None = None,
                   ) -> tuple[int, bytes, Any]:
    async with s.get(f"{url}/api/events", params={"limit": "200", "cursor": cursor},
                     headers=headers or {}) as resp:
        return resp.status, await resp.read(), resp.headers


async def test_50_concurrent_listing_misses_make_one_call_per_shard(cluster: Cluster,
                                                                   cached_gateway: str) -> None:
    cursor = cursor_at(fresh_position())
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        before = await listing_calls(s, cluster)
        answers = await asyncio.gather(*(get_page(s, cached_gateway, cursor) for _ in range(50)))
        after = await listing_calls(s, cluster)
    assert {status for status, _, _ in answers} == {200}
    assert len({body for _, body, _ in answers}) == 1
    calls = after - before
    print(f"\n50 concurrent misses of one page: booking-service listing calls {dict(calls)}")
    assert calls == {"shard-a": 1, "shard-b": 1}, calls


async def test_cache_control_and_a_consistency_token_past_the_cache(cluster: Cluster,
                                                                   cached_gateway: str) -> None:
    position = fresh_position()
    cursor = cursor_at(position)
    east = cached_gateway
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        status, body, headers = await get_page(s, east, cursor)
        assert status == 200
        max_age = re.fullmatch(r"public, max-age=(\d+)", headers["Cache-Control"])
        assert max_age is not None and 0 < int(max_age[1]) <= 600, headers["Cache-Control"]
        assert {"Cookie", "X-Consistency-Token"} <= {v.strip() for v in headers["Vary"].split(",")}

        # A client carrying a token, valid or not, gets a private answer.
        for forged in ({"X-Consistency-Token": "forged"}, {"Cookie": "boxoffice_ct=forged"}):
            status, forged_body, headers = await get_page(s, east, cursor, forged)
            assert status == 200 and headers["Cache-Control"] == PRIVATE
            assert forged_body == body  # a forged token is ignored: the cached page

        # A real token (from a booking) reads past the cached page; anonymous reads do not.
        # The event right after the cursor: first on the page that reads past the cache.
        event = await create_event_doc(s, east, [5], shard="shard-a", token=ADMIN_TOKEN,
                                       starts_at=(position + timedelta(seconds=1)).isoformat())
        async with s.post(f"{east}/api/bookings", json={
                "eventId": event["id"], "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}],
        }) as resp:
            assert resp.status == 201, await resp.text()
            token = resp.headers["X-Consistency-Token"]
        before = await listing_calls(s, cluster)
        status, _, headers = await get_page(s, east, cursor)
        assert status == 200 and headers["Cache-Control"].startswith("public")
        assert await listing_calls(s, cluster) == before  # served by the cache
        status, fresh, headers = await get_page(s, east, cursor, {"X-Consistency-Token": token})
        assert status == 200 and headers["Cache-Control"] == PRIVATE
        calls = await listing_calls(s, cluster) - before
        assert calls["shard-a"] >= 1 and calls["shard-b"] >= 1, calls
        assert event["id"] in fresh.decode() and event["id"] not in body.decode()
