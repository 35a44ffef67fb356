"""The booking page (gateway/static/index.html) in a real headless Chromium, driven by
Playwright (tests/browser.py: a fresh browser context for each test).

The page is opened on the *west* gateway while the events live on shard-a,
homed in east: its reads come from west's replica, its bookings go to east's
primary, and the consistency cookie the browser keeps makes its own bookings
visible at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import aiohttp
from playwright.async_api import Locator, Page, Route, expect

from deploy.cluster import Cluster
from tests.browser import wait_for
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


def js(value: Any) -> str:
    return json.dumps(value)


def whole(text: str) -> re.Pattern[str]:
    """All of an element's text, as is (`to_have_text` with a plain string would
    compare it with its whitespace collapsed)."""
    return re.compile(f"^{re.escape(text)}$")


BOOKED = re.compile("^Booked!")


def remaining(page: Page, tier_id: str) -> Locator:
    return page.locator(f'td.remaining[data-tier="{tier_id}"]')


async def remaining_is(page: Page, tier_id: str, text: str, timeout: float = 5.0) -> None:
    await expect(remaining(page, tier_id)).to_have_text(whole(text), timeout=timeout * 1000)


async def shown_booking(page: Page) -> dict[str, Any]:
    """Wait for "Booked!" and return the booking the page shows as JSON."""
    await expect(page.locator("#message")).to_have_text(BOOKED)
    return json.loads(await page.locator("#booking").text_content() or "{}")


async def shown_error(page: Page) -> str:
    """Wait until the page shows an error line, and return its text."""
    return await page.locator("#error").text_content() or ""


async def booked_other_than(page: Page, field: str, value: str) -> None:
    """Wait until the page shows a booking whose `field` is not `value`."""
    await wait_for(page, f"""(() => {{
        const shown = document.querySelector('#booking');
        return shown !== null && JSON.parse(shown.textContent)[{js(field)}] !== {js(value)};
    }})()""")


async def open_event(page: Page, cluster: Cluster, event_id: str) -> None:
    await page.goto(f"{gw(cluster, PAGE_REGION)}/")
    await page.locator(f'button.event[data-id="{event_id}"]').click()
    await wait_for(page, "!document.querySelector('#order').hidden")


async def lose_next_answer(page: Page, url_glob: str) -> list[int]:
    """The next request of the page that matches `url_glob` reaches the server (sent by
    Playwright with the page's method, headers and body), but the server's answer is
    dropped and the page's request fails with a connection reset, as when an answer is
    lost on the way back. Returns a list that receives the status the page never saw."""
    lost: list[int] = []

    async def cut_off(route: Route) -> None:
        answer = await route.fetch()
        lost.append(answer.status)
        await route.abort("connectionreset")

    await page.route(url_glob, cut_off, times=1)
    return lost


async def test_browse_book_and_see_live_counts(
    page: Page, page_errors: list[str], cluster: Cluster
) -> None:
    event = await new_event(cluster, [(TRICKY_NAME, 5), ("Balcony", 3)])
    floor, balcony = (t["id"] for t in event["tiers"])

    await page.goto(f"{gw(cluster, PAGE_REGION)}/")
    await expect(page.locator("#region")).to_contain_text("west")
    listed = await page.locator(f'button.event[data-id="{event["id"]}"]').text_content() or ""
    assert event["name"] in listed and "Web Hall" in listed and SHARD in listed

    await page.locator(f'button.event[data-id="{event["id"]}"]').click()
    await remaining_is(page, floor, "5 / 5")
    await remaining_is(page, balcony, "3 / 3")
    assert await page.locator("#event-title").text_content() == event["name"]
    names = await page.locator("td.tier-name").all_text_contents()
    assert sorted(names) == sorted([TRICKY_NAME, "Balcony"])
    assert await page.evaluate("window.injected === undefined && !document.querySelector('td img')")
    # Every quantity field has a label naming its tier.
    assert await page.locator(f"#qty-{floor}").evaluate("input => input.labels[0].textContent") \
        == f"Quantity of {TRICKY_NAME}"

    # Book 2 + 1: "Booked!", the booking as JSON, the counts drop.
    await page.locator(f"#qty-{floor}").fill("2")
    await page.locator(f"#qty-{balcony}").fill("1")
    await page.locator("#book").click()
    booking = await shown_booking(page)
    assert booking["eventId"] == event["id"] and booking["status"] == "confirmed"
    assert {i["ticketTierId"]: i["quantity"] for i in booking["items"]} == {floor: 2, balcony: 1}
    assert booking["totalCents"] == 3 * 2500
    await remaining_is(page, floor, "3 / 5")
    await remaining_is(page, balcony, "2 / 3")

    # More than is left: the 409 problem's detail, naming the tier; nothing written.
    await page.locator(f"#qty-{floor}").fill("4")
    await page.locator("#book").click()
    error = await shown_error(page)
    assert TRICKY_NAME in error, error
    assert await page.locator("#error").get_attribute("role") == "alert"
    tiers = await check_invariants(primary_dsn(cluster), event["id"])
    assert (tiers[floor]["sold"], tiers[balcony]["sold"]) == (2, 1)
    await remaining_is(page, floor, "3 / 5")

    # Another client books: the page's count follows without a reload.
    async with aiohttp.ClientSession() as s, s.post(f"{gw(cluster, HOME)}/api/bookings", json={
        "eventId": event["id"], "items": [{"ticketTierId": balcony, "quantity": 2}]}) as resp:
        assert resp.status == 201, await resp.text()
    await remaining_is(page, balcony, "0 / 3", timeout=8.0)
    assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert page_errors == []


async def test_double_click_books_once_without_secure_context_uuid(
    page: Page, page_errors: list[str], cluster: Cluster
) -> None:
    """Plain http on a non-localhost address has no crypto.randomUUID; a double
    click must not book twice."""
    event = await new_event(cluster, [("Standing", 10)])
    (tier,) = (t["id"] for t in event["tiers"])
    await page.add_init_script("delete Crypto.prototype.randomUUID;")
    await open_event(page, cluster, event["id"])
    assert await page.evaluate("typeof crypto.randomUUID") == "undefined"

    await page.locator(f"#qty-{tier}").fill("3")
    await page.locator("#book").dblclick()  # two clicks, the second while the first books
    booking = await shown_booking(page)
    reference = uuid.UUID(booking["clientReference"])
    assert reference.version == 4 and str(reference) == booking["clientReference"]
    await expect(page.locator("#book")).to_be_enabled()

    posts = await page.evaluate(
        "performance.getEntriesByType('resource').filter(e => e.name.endsWith('/api/bookings')).length"
    )
    assert posts == 1
    tiers = await check_invariants(primary_dsn(cluster), event["id"])
    assert tiers[tier]["sold"] == 3
    await remaining_is(page, tier, "7 / 10")

    # The next booking is a new attempt with a new reference.
    await page.locator(f"#qty-{tier}").fill("1")
    await page.locator("#book").click()
    await booked_other_than(page, "clientReference", booking["clientReference"])
    await remaining_is(page, tier, "6 / 10")
    assert (await check_invariants(primary_dsn(cluster), event["id"]))[tier]["sold"] == 4
    assert page_errors == []


async def test_lost_answer_is_retried_as_sent_and_books_once(
    page: Page, page_errors: list[str], cluster: Cluster
) -> None:
    """The server books but its answer never reaches the page (connection reset on the
    way back). The page cannot know whether it booked: it freezes the choice, and
    Book retries that very request (same reference, same items), which answers the
    booking already made. Changing the quantities meanwhile must not book again."""
    event = await new_event(cluster, [("Pit", 10)])
    (tier,) = (t["id"] for t in event["tiers"])
    await open_event(page, cluster, event["id"])
    lost = await lose_next_answer(page, "**/api/bookings")

    quantity = page.locator(f"#qty-{tier}")
    await quantity.fill("2")
    await page.locator("#book").click()
    error = await shown_error(page)
    assert "retry it safely" in error, error
    assert lost == [201]  # the server booked; the page never saw it
    assert (await check_invariants(primary_dsn(cluster), event["id"]))[tier]["sold"] == 2

    # The choice is frozen: the quantity and the event list are disabled ...
    assert await quantity.is_disabled()
    assert await page.evaluate("[...document.querySelectorAll('button.event')].every(b => b.disabled)")
    # ... and even a value changed behind the page's back (no user can type into a
    # disabled field) is not what gets retried.
    await quantity.evaluate("""input => {
        input.value = "3";
        input.dispatchEvent(new Event("input", {bubbles: true}));
        input.dispatchEvent(new Event("change", {bubbles: true}));
    }""")
    await page.locator("#book").click()
    booking = await shown_booking(page)
    assert [(i["ticketTierId"], i["quantity"]) for i in booking["items"]] == [(tier, 2)]

    tiers = await check_invariants(primary_dsn(cluster), event["id"])
    assert tiers[tier]["sold"] == 2
    await remaining_is(page, tier, "8 / 10")
    # A definitive answer unfreezes the form; the next booking is a new one.
    assert not await quantity.is_disabled()
    assert not await page.locator("button.event").first.is_disabled()
    await quantity.fill("1")
    await page.locator("#book").click()
    await booked_other_than(page, "id", booking["id"])
    assert (await check_invariants(primary_dsn(cluster), event["id"]))[tier]["sold"] == 3
    assert page_errors == []
