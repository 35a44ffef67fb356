"""The booking page (gateway/static/index.html) in a real headless chromium.

The page is opened on the *west* gateway while the events live on shard-a,
homed in east: its reads come from west's replica, its bookings go to east's
primary, and the consistency cookie the browser keeps makes its own bookings
visible at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from deploy.cluster import Cluster
from tests.browser import Browser
from tests.support import check_invariants, create_event_doc
from tests.support import gateway_url as gw

SHARD, HOME, PAGE_REGION = "shard-a", "east", "west"
# Markup characters, quotes and an ampersand entity: shown as text, never parsed.
TRICKY_NAME = 'Floor "A" <img src=x onerror="window.injected=1"> &amp; more'


def primary_dsn(cluster: Cluster) -> str:
    return cluster.databases[(SHARD, HOME)].dsn


async def new_event(cluster: Cluster, tiers: list[tuple[str, int]]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        # early, so it is on the first page of the listing whatever else exists
        doc = await create_event_doc(s, gw(cluster, HOME), tiers, shard=SHARD, venue="Web Hall",
                                     starts_at="2026-01-02T20:00:00Z", price_cents=2500)
    await listed_in(cluster, PAGE_REGION, doc["id"])
    return doc


async def listed_in(cluster: Cluster, region: str, event_id: str, timeout: float = 5.0) -> None:
    """Wait until a region's gateway lists the event (its replica has caught up with it)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(f"{gw(cluster, region)}/api/events?limit=50") as resp:
                if any(e["id"] == event_id for e in (await resp.json())["events"]):
                    return
            assert time.monotonic() < deadline, f"event {event_id} not listed in {region}"
            await asyncio.sleep(0.05)  # poll interval


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with Browser() as b:
        yield b


def js(value: Any) -> str:
    return json.dumps(value)


def remaining_cell(tier_id: str) -> str:
    return f'td.remaining[data-tier="{tier_id}"]'


async def remaining_is(browser: Browser, tier_id: str, text: str, timeout: float = 5.0) -> None:
    await browser.wait_for(
        f"document.querySelector({js(remaining_cell(tier_id))})?.textContent === {js(text)}", timeout
    )


async def booked_other_than(browser: Browser, field: str, value: str) -> None:
    """Wait until the page shows a booking whose `field` is not `value`."""
    await browser.wait_for(f"""(() => {{
        const shown = document.querySelector('#booking');
        return shown !== null && JSON.parse(shown.textContent)[{js(field)}] !== {js(value)};
    }})()""")


async def open_event(browser: Browser, cluster: Cluster, event_id: str) -> None:
    await browser.navigate(f"{gw(cluster, PAGE_REGION)}/")
    await browser.wait_for(f"document.querySelector('button.event[data-id=\"{event_id}\"]')")
    await browser.click(f'button.event[data-id="{event_id}"]')
    await browser.wait_for("!document.querySelector('#order').hidden")


async def test_browse_book_and_see_live_counts(browser: Browser, cluster: Cluster) -> None:
    event = await new_event(cluster, [(TRICKY_NAME, 5), ("Balcony", 3)])
    floor, balcony = (t["id"] for t in event["tiers"])

    await browser.navigate(f"{gw(cluster, PAGE_REGION)}/")
    assert await browser.wait_for("document.querySelector('#region').textContent.includes('west')")
    await browser.wait_for(f"document.querySelector('button.event[data-id=\"{event['id']}\"]')")
    listed = await browser.text(f'button.event[data-id="{event["id"]}"]')
    assert event["name"] in listed and "Web Hall" in listed and SHARD in listed

    await browser.click(f'button.event[data-id="{event["id"]}"]')
    await remaining_is(browser, floor, "5 / 5")
    await remaining_is(browser, balcony, "3 / 3")
    assert await browser.text("#event-title") == event["name"]
    names = await browser.evaluate("[...document.querySelectorAll('td.tier-name')].map(c => c.textContent)")
    assert sorted(names) == sorted([TRICKY_NAME, "Balcony"])
    assert await browser.evaluate("window.injected === undefined && !document.querySelector('td img')")
    # Every quantity field has a label naming its tier.
    assert await browser.evaluate(f"document.querySelector('#qty-{floor}').labels[0].textContent") \
        == f"Quantity of {TRICKY_NAME}"

    # Book 2 + 1: "Booked!", the booking as JSON, the counts drop.
    await browser.fill(f"#qty-{floor}", "2")
    await browser.fill(f"#qty-{balcony}", "1")
    await browser.click("#book")
    await browser.wait_for("document.querySelector('#message')?.textContent.startsWith('Booked!')")
    booking = json.loads(await browser.text("#booking") or "{}")
    assert booking["eventId"] == event["id"] and booking["status"] == "confirmed"
    assert {i["ticketTierId"]: i["quantity"] for i in booking["items"]} == {floor: 2, balcony: 1}
    assert booking["totalCents"] == 3 * 2500
    await remaining_is(browser, floor, "3 / 5")
    await remaining_is(browser, balcony, "2 / 3")

    # More than is left: the 409 problem's detail, naming the tier; nothing written.
    await browser.fill(f"#qty-{floor}", "4")
    await browser.click("#book")
    error = await browser.wait_for("document.querySelector('#error')?.textContent")
    assert TRICKY_NAME in error, error
    assert await browser.evaluate("document.querySelector('#error').getAttribute('role')") == "alert"
    tiers = await check_invariants(primary_dsn(cluster), event["id"])
    assert (tiers[floor]["sold"], tiers[balcony]["sold"]) == (2, 1)
    await remaining_is(browser, floor, "3 / 5")

    # Another client books: the page's count follows without a reload.
    async with aiohttp.ClientSession() as s, s.post(f"{gw(cluster, HOME)}/api/bookings", json={
        "eventId": event["id"], "items": [{"ticketTierId": balcony, "quantity": 2}]}) as resp:
        assert resp.status == 201, await resp.text()
    await remaining_is(browser, balcony, "0 / 3", timeout=8.0)
    assert await browser.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert browser.errors == []


async def test_double_click_books_once_without_secure_context_uuid(
    browser: Browser, cluster: Cluster
) -> None:
    """Plain http on a non-localhost address has no crypto.randomUUID; a double
    click must not book twice."""
    event = await new_event(cluster, [("Standing", 10)])
    (tier,) = (t["id"] for t in event["tiers"])
    await browser.before_page_scripts("delete Crypto.prototype.randomUUID;")
    await open_event(browser, cluster, event["id"])
    assert await browser.evaluate("typeof crypto.randomUUID") == "undefined"

    await browser.fill(f"#qty-{tier}", "3")
    await browser.click("#book")
    await browser.click("#book")
    await browser.wait_for("document.querySelector('#message')?.textContent.startsWith('Booked!')")
    booking = json.loads(await browser.text("#booking") or "{}")
    reference = uuid.UUID(booking["clientReference"])
    assert reference.version == 4 and str(reference) == booking["clientReference"]
    await browser.wait_for("!document.querySelector('#book').disabled")

    posts = await browser.evaluate(
        "performance.getEntriesByType('resource').filter(e => e.name.endsWith('/api/bookings')).length"
    )
    assert posts == 1
    tiers = await check_invariants(primary_dsn(cluster), event["id"])
    assert tiers[tier]["sold"] == 3
    await remaining_is(browser, tier, "7 / 10")

    # The next booking is a new attempt with a new reference.
    await browser.fill(f"#qty-{tier}", "1")
    await browser.click("#book")
    await booked_other_than(browser, "clientReference", booking["clientReference"])
    await remaining_is(browser, tier, "6 / 10")
    assert (await check_invariants(primary_dsn(cluster), event["id"]))[tier]["sold"] == 4
    assert browser.errors == []


async def test_lost_answer_is_retried_as_sent_and_books_once(
    browser: Browser, cluster: Cluster
) -> None:
    """The server books but its answer never reaches the page (connection reset on the
    way back). The page cannot know whether it booked: it freezes the choice, and
    Book retries that very request (same reference, same items), which answers the
    booking already made. Changing the quantities meanwhile must not book again."""
    event = await new_event(cluster, [("Pit", 10)])
    (tier,) = (t["id"] for t in event["tiers"])
    await open_event(browser, cluster, event["id"])
    lost = await browser.lose_responses("*/api/bookings", count=1)

    await browser.fill(f"#qty-{tier}", "2")
    await browser.click("#book")
    error = await browser.wait_for("document.querySelector('#error')?.textContent")
    assert "retry it safely" in error, error
    assert lost == [201]  # the server booked; the page never saw it
    assert (await check_invariants(primary_dsn(cluster), event["id"]))[tier]["sold"] == 2

    # The choice is frozen: the quantity and the event list are disabled ...
    assert await browser.evaluate(f"document.querySelector('#qty-{tier}').disabled")
    assert await browser.evaluate(
        "[...document.querySelectorAll('button.event')].every(b => b.disabled)")
    # ... and even a value changed behind the page's back is not what gets retried.
    await browser.fill(f"#qty-{tier}", "3")
    await browser.click("#book")
    await browser.wait_for("document.querySelector('#message')?.textContent.startsWith('Booked!')")
    booking = json.loads(await browser.text("#booking") or "{}")
    assert [(i["ticketTierId"], i["quantity"]) for i in booking["items"]] == [(tier, 2)]

    tiers = await check_invariants(primary_dsn(cluster), event["id"])
    assert tiers[tier]["sold"] == 2
    await remaining_is(browser, tier, "8 / 10")
    # A definitive answer unfreezes the form; the next booking is a new one.
    assert not await browser.evaluate(f"document.querySelector('#qty-{tier}').disabled")
    assert not await browser.evaluate("document.querySelector('button.event').disabled")
    await browser.fill(f"#qty-{tier}", "1")
    await browser.click("#book")
    await booked_other_than(browser, "id", booking["id"])
    assert (await check_invariants(primary_dsn(cluster), event["id"]))[tier]["sold"] == 3
    assert browser.errors == []
