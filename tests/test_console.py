"""The operator console (`/admin/`, gateway/console.py) in a real headless Chromium driven
by Playwright (tests/browser.py: a fresh browser context for each test), on the real
cluster (tests/conftest.py `cluster`: regions east and west, shard-a homed in east with
its zone standby east/b, shard-b homed in west with west/b).

The browser signs in through the console's own form, for each test; every wait polls the
page's DOM with a deadline. Each test leaves the cluster as it found it: every shard's
primary in its home, every copy running in its map role and passing its health check.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, expect

from common import operator_session
from deploy.cluster import Cluster
from failover.lease import Lease, shard_lock
from tests.browser import wait_for
from tests.conftest import ADMIN_TOKEN
from tests.support import gateway_url
from tests.test_promote import AUTH, read_shard, run_cli, store_for, wait_copies_settled

PAGE_REGION = "west"
SEEN_WITHIN = 5.0  # acceptance: a change shows "within a few seconds", without a reload


def js(value: Any) -> str:
    return json.dumps(value)


def copy_card(shard: str, copy: str) -> str:
    return f'.copy[data-shard="{shard}"][data-copy="{copy}"]'


async def signed_in(page: Page, base: str) -> None:
    """Sign in through the form, as an operator does, and wait for the console's first round."""
    await page.goto(f"{base}/operator/login")
    await page.locator("#token").fill(ADMIN_TOKEN)
    await page.locator("#sign-in").click()
    await page.wait_for_url(f"{base}/admin/", timeout=10_000)
    await expect(page.locator(".copy").first).to_be_attached(timeout=10_000)


@pytest.fixture
async def console(cluster: Cluster, page: Page) -> Page:
    await signed_in(page, gateway_url(cluster, PAGE_REGION))
    return page


async def attribute(page: Page, selector: str, name: str) -> str | None:
    return await page.locator(selector).get_attribute(name)


async def wait_attribute(page: Page, selector: str, name: str, value: str, timeout: float) -> None:
    await expect(page.locator(selector)).to_have_attribute(name, value, timeout=timeout * 1000)


async def shard_event(page: Page, shard: str, text: str) -> None:
    """Wait until the shard's event list shows a line containing `text`."""
    await wait_for(page, f"[...document.querySelectorAll('.event-list[data-shard={js(shard)}] li')]"
                         f".some(li => li.textContent.includes({js(text)}))", SEEN_WITHIN)


# --- access -------------------------------------------------------------------------------------

async def test_the_console_refuses_to_load_without_the_token(cluster: Cluster, page: Page) -> None:
    base = gateway_url(cluster, "east")
    async with aiohttp.ClientSession() as session:
        for path in ("/admin/", "/admin/api/state", "/admin/console.js"):
            async with session.get(base + path) as resp:
                body = await resp.text()
                assert resp.status == 401, (path, resp.status)
                assert resp.content_type == "application/problem+json" and "shard-a" not in body
            async with session.get(base + path, headers={"Authorization": "Bearer not-the-token"}) as resp:
                assert resp.status == 403, (path, resp.status)
        forged = f"v1.{int(time.time()) + 3600}.{'0' * 64}"
        async with session.get(f"{base}/admin/api/state",
                               headers={"Cookie": f"{operator_session.COOKIE_NAME}={forged}"}) as resp:
            assert resp.status == 401
        async with session.post(f"{base}/operator/login", data={"token": "not-the-token"}) as resp:
            assert resp.status == 403 and "Set-Cookie" not in resp.headers
        # the bearer header opens it (curl, a proxy), and the state names the shards
        async with session.get(f"{base}/admin/", headers=AUTH) as resp:
            assert resp.status == 200 and 'id="map"' in await resp.text()
        async with session.get(f"{base}/admin/api/state", headers=AUTH) as resp:
            assert resp.status == 200
            assert {s["name"] for s in (await resp.json())["shards"]} == {"shard-a", "shard-b"}

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.post(f"{base}/operator/login", data={"token": ADMIN_TOKEN}) as resp:
            assert resp.status == 204
            cookie = resp.cookies[operator_session.COOKIE_NAME]
            assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/admin"
        async with session.get(f"{base}/admin/api/state") as resp:
            assert resp.status == 200  # the session views ...
        async with session.post(f"{base}/admin/shards/shard-b/switchover", json={"to": "west/b"}) as resp:
            assert resp.status == 401  # ... and never acts: actions need the bearer header

    # the browser, in a fresh context: no session
    await page.goto(f"{base}/admin/")
    status = await page.evaluate("performance.getEntriesByType('navigation')[0].responseStatus")
    assert status == 401
    assert await page.evaluate("document.getElementById('map') === null"
                               " && document.querySelectorAll('.copy').length === 0")
    assert "unauthenticated" in (await page.locator("body").text_content() or "")


# --- the picture --------------------------------------------------------------------------------

async def test_the_console_shows_every_shard_with_its_primary_and_replicas(
        cluster: Cluster, console: Page, page_errors: list[str]) -> None:
    for name in ("shard-a", "shard-b"):
        record = await wait_copies_settled(cluster, name)
        head = f'.shard-head[data-shard="{name}"]'
        await wait_attribute(console, head, "data-primary", record.primary_copy, SEEN_WITHIN)
        assert await attribute(console, head, "data-epoch") == str(record.epoch)
        for key, member in record.members.items():
            card = copy_card(name, key)
            role = "primary" if key == record.primary_copy else "replica"
            await wait_attribute(console, card, "data-state", "ok", SEEN_WITHIN)
            assert await attribute(console, card, "data-role") == role
            assert await attribute(console, card, "data-health") == "passing"
            assert await attribute(console, card, "data-epoch") == str(record.epoch)
            # drawn in its region's column
            assert await console.locator(card).evaluate(
                "copy => copy.closest('.cell').dataset.region") == member.region
            if role == "replica":
                lag = await console.evaluate(
                    f"[...document.querySelectorAll({js(card + ' dt')})]"
                    ".find(dt => dt.textContent === 'lag')?.nextElementSibling.textContent")
                assert lag is not None and lag.split()[-1] in ("B", "KiB", "MiB"), lag
    cards = await console.locator(".copy").count()
    assert cards == 6  # 2 shards x 3 copies, nothing else drawn as a copy
    assert page_errors == []


async def test_a_stopped_replica_is_marked_within_seconds_without_a_reload(
        cluster: Cluster, console: Page) -> None:
    await wait_copies_settled(cluster, "shard-a")
    card = copy_card("shard-a", "west")
    await wait_attribute(console, card, "data-state", "ok", SEEN_WITHIN)
    await console.evaluate("window.__sameDocument = true")
    cluster.stop_copy("shard-a", "west")
    try:
        await wait_attribute(console, card, "data-state", "stopped", SEEN_WITHIN)
        assert await attribute(console, card, "data-role") == "replica"  # the map still says so
        await shard_event(console, "shard-a", "west (replica) is stopped")
    finally:
        cluster.start_copy("shard-a", "west")
    await wait_copies_settled(cluster, "shard-a")
    await wait_attribute(console, card, "data-state", "ok", 15.0)
    assert await console.evaluate("window.__sameDocument === true")  # never reloaded


async def test_a_switchover_shows_the_new_primary(cluster: Cluster, console: Page) -> None:
    before = await wait_copies_settled(cluster, "shard-b")
    assert before.primary_copy == "west"
    head = '.shard-head[data-shard="shard-b"]'
    code, out = await run_cli(cluster, "shard", "switchover", "shard-b", "--to", "west/b", "--json")
    try:
        assert code == 0, out
        await wait_attribute(console, head, "data-primary", "west/b", SEEN_WITHIN)
        assert await attribute(console, head, "data-epoch") == str(before.epoch + 1)
        assert await attribute(console, copy_card("shard-b", "west/b"), "data-role") == "primary"
        assert await attribute(console, copy_card("shard-b", "west"), "data-role") == "replica"
        await shard_event(console, "shard-b", f"primary west/b at epoch {before.epoch + 1}")
    finally:
        await wait_copies_settled(cluster, "shard-b")
        code, out = await run_cli(cluster, "shard", "switchover", "shard-b", "--to", "west", "--json")
        assert code == 0, out
    await wait_attribute(console, head, "data-primary", "west", SEEN_WITHIN)
    assert await attribute(console, head, "data-epoch") == str(before.epoch + 2)
    record = await wait_copies_settled(cluster, "shard-b")
    assert record.primary_copy == "west"


# --- operations and drills ----------------------------------------------------------------------

async def test_an_operation_lease_and_a_saved_drill_report_are_shown(
        cluster: Cluster, console: Page) -> None:
    owner = f"console test {uuid.uuid4().hex[:8]}"
    kind = f"test-{uuid.uuid4().hex[:8]}"
    report = {"shard": "shard-a", "kind": kind, "mode": "manual", "startedAt": "2099-01-01T00:00:00.000Z",
              "oldPrimary": "east", "newPrimary": "east/b", "oldEpoch": 7, "newEpoch": 8, "ok": True,
              "times": {"detectSeconds": 0.5, "promoteSeconds": 1.25, "writesBackSeconds": 2.0},
              "writes": {"longestGapSeconds": 1.5},
              "bookings": {"confirmed": 42, "missing": 0, "oversold": 0, "duplicatedReferences": 0},
              "clientErrors": {}}
    name = f"drill-shard-a-{kind}"
    async with store_for(cluster) as store:
        lease = await Lease.take(store, shard_lock("shard-a"), owner)
        index = await store.put_journal(name, report, 0)
        try:
            await wait_for(console, f"document.getElementById('operations').textContent"
                                    f".includes({js(owner)})", SEEN_WITHIN)
            await wait_for(console, f"document.getElementById('drills').textContent.includes({js(kind)})",
                           SEEN_WITHIN)
            drills = await console.locator("#drills").text_content() or ""
            assert "east → east/b (epoch 7 → 8)" in drills and "42 confirmed, 0 missing" in drills
        finally:
            await lease.release()
            await store.delete_journal(name, index)
        await wait_for(console, f"!document.getElementById('operations').textContent.includes({js(owner)})",
                       SEEN_WITHIN)
    shard, _ = await read_shard(cluster, "shard-a")
    assert shard.primary_copy == "east"


def test_a_session_cookie_is_valid_only_for_its_token_until_it_expires() -> None:
    now = 1_900_000_000
    cookie = operator_session.issue("token-1", now=now, lifetime=60)
    assert operator_session.valid(cookie, "token-1", now=now + 59)
    assert not operator_session.valid(cookie, "token-1", now=now + 60)  # expired
    assert not operator_session.valid(cookie, "token-2", now=now)  # the token changed
    version, session_id, expires, mac = cookie.split(".")
    later = int(expires) + 3600
    assert not operator_session.valid(f"{version}.{session_id}.{later}.{mac}", "token-1", now=now)
    other_id = ("0" if session_id[0] != "0" else "1") + session_id[1:]
    assert not operator_session.valid(f"{version}.{other_id}.{expires}.{mac}", "token-1", now=now)
    assert operator_session.issue("token-1", now=now) != operator_session.issue("token-1", now=now)
    for garbage in ("", "v2", "v2...", f"v1.{expires}.{mac}", f"v2.{session_id}.-5.{mac}",
                    f"v2.{session_id}.1e9.{mac}", f"v2.{session_id.upper()}.{expires}.{mac}",
                    f"{cookie}.x", "\udcff", cookie + "\udcff"):
        assert not operator_session.valid(garbage, "token-1", now=now), garbage
