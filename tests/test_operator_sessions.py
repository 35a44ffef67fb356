"""Operator sessions and the pages' headers (issue 21, item 8), on the session cluster
(tests/conftest.py `cluster`: gateways east and west, a booking service and a node agent
per host).

Each test reproduces an attack of the security review and shows it fails now:
- a copied console cookie still worked after its operator signed out;
- the console's cookie opened booking services' and node agents' operator APIs;
- `/operator/login` took any number of guesses;
- a process started with a short operator token;
- the public page could be framed and ran any script (no CSP, no X-Frame-Options);
- process logs were readable by every local user.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import uuid

import aiohttp
import pytest
from playwright.async_api import Page, expect

from common import operator_session
from common.auth import ADMIN_TOKEN_ENV
from deploy.cluster import Cluster
from tests.conftest import ADMIN_TOKEN
from tests.support import create_event, extra_gateway, poll
from tests.support import gateway_url as gw

COOKIE = operator_session.COOKIE_NAME


async def signed_in_cookie(base: str) -> str:
    """Sign in on a gateway through the form's POST; the session cookie's value."""
    async with aiohttp.ClientSession() as session, session.post(
            f"{base}/operator/login", data={"token": ADMIN_TOKEN}) as resp:
        assert resp.status == 204, await resp.text()
        return resp.cookies[COOKIE].value


async def status_with_cookie(url: str, value: str, method: str = "GET") -> int:
    async with aiohttp.ClientSession() as session, session.request(
            method, url, headers={"Cookie": f"{COOKIE}={value}"}) as resp:
        return resp.status


async def test_signing_out_ends_a_copied_session_on_every_gateway(cluster: Cluster) -> None:
    east, west = gw(cluster, "east"), gw(cluster, "west")
    cookie = await signed_in_cookie(east)
    for base in (east, west):  # any gateway of the cluster takes the session
        assert await status_with_cookie(f"{base}/admin/api/state", cookie) == 200, base
    stolen = cookie  # a copy, taken before the operator signs out

    async with aiohttp.ClientSession() as session, session.post(
            f"{east}/admin/logout", headers={"Cookie": f"{COOKIE}={cookie}"}) as resp:
        assert resp.status == 204
        assert resp.cookies[COOKIE].value == ""  # the browser's copy is cleared

    assert await status_with_cookie(f"{east}/admin/api/state", stolen) == 401

    async def refused_on_west() -> bool:  # the other gateway honours it within a second
        return await status_with_cookie(f"{west}/admin/api/state", stolen) == 401

    await poll(refused_on_west, "the signed-out session is refused by the other gateway", timeout=10)
    # A new sign-in is a new session, unaffected.
    assert await status_with_cookie(f"{west}/admin/api/state", await signed_in_cookie(west)) == 200


async def test_the_console_cookie_opens_nothing_but_the_console(cluster: Cluster) -> None:
    assert cluster.plan is not None
    east = gw(cluster, "east")
    cookie = await signed_in_cookie(east)
    assert await status_with_cookie(f"{east}/admin/api/state", cookie) == 200  # its audience
    async with aiohttp.ClientSession() as session:
        event = await create_event(session, east, [5])
    # Other operator routes of the gateway, viewing ones included: bearer only.
    assert await status_with_cookie(f"{east}/admin/map", cookie) == 401
    # Booking services and node agents never take it.
    for host in cluster.plan.service_ports:
        service = cluster.plan.service_url(host)
        assert await status_with_cookie(f"{service}/admin/events/{event.id}/audit", cookie) == 401, host
    for host in cluster.plan.agent_ports:
        agent = cluster.plan.agent_url(host)
        assert await status_with_cookie(f"{agent}/agent/copies", cookie) == 401, host
        assert await status_with_cookie(f"{agent}/agent/drill/crash", cookie, "POST") == 401, host
    # A session MAC'd for the old form (keyed with the token itself) is refused as well.
    legacy = operator_session_v1(ADMIN_TOKEN)
    assert await status_with_cookie(f"{east}/admin/api/state", legacy) == 401


def operator_session_v1(token: str) -> str:
    """The cookie the gateway issued before sessions had an audience."""
    import hashlib
    import hmac
    import time

    expires = int(time.time()) + 3600
    mac = hmac.new(token.encode(), f"boxoffice-operator-session v1 {expires}".encode(), hashlib.sha256)
    return f"v1.{expires}.{mac.hexdigest()}"


async def test_sign_in_is_throttled_per_address(cluster: Cluster) -> None:
    west = gw(cluster, "west")
    guesser = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.7", 0)))
    async with guesser:
        statuses = []
        for n in range(30):
            async with guesser.post(f"{west}/operator/login", data={"token": f"guess-{n}"}) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert int(resp.headers["Retry-After"]) >= 1
        assert statuses.count(403) <= 15 and statuses[-1] == 429, statuses
        # Once throttled, even the right token is refused: no oracle in the answers.
        async with guesser.post(f"{west}/operator/login", data={"token": ADMIN_TOKEN}) as resp:
            assert resp.status == 429
    # Another address signs in.
    operator = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.8", 0)))
    async with operator, operator.post(f"{west}/operator/login", data={"token": ADMIN_TOKEN}) as resp:
        assert resp.status == 204


async def test_a_process_refuses_to_start_with_a_weak_operator_token() -> None:
    for weak in ("secret", "a" * 40, "short-but-random-9f3k"):
        env = {**os.environ, ADMIN_TOKEN_ENV: weak}
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "--port", "0", "--consul", "127.0.0.1:1"],
            env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode != 0, (weak, proc.stdout[-500:], proc.stderr[-500:])
        assert "too weak" in proc.stderr, proc.stderr[-500:]


async def test_pages_forbid_framing_and_foreign_scripts(cluster: Cluster) -> None:
    east = gw(cluster, "east")
    async with aiohttp.ClientSession() as session:
        for path, headers in (("/", {}), ("/operator/login", {}),
                              ("/admin/", {"Authorization": f"Bearer {ADMIN_TOKEN}"}),
                              ("/api/events", {}), ("/api/bookings/" + str(uuid.uuid4()), {})):
            async with session.get(east + path, headers=headers) as resp:
                assert resp.headers.get("X-Frame-Options") == "DENY", path
                assert resp.headers.get("X-Content-Type-Options") == "nosniff", path
                assert resp.headers.get("Referrer-Policy") == "no-referrer", path
                policy = resp.headers.get("Content-Security-Policy", "")
                assert "frame-ancestors 'none'" in policy, (path, policy)
                assert "unsafe-inline" not in policy.partition("script-src")[2].partition(";")[0], policy
                if path == "/":
                    assert "script-src 'sha256-" in policy and "connect-src 'self'" in policy, policy


def test_process_logs_are_private_to_the_operator(cluster: Cluster) -> None:
    logs = sorted(cluster.state_dir.rglob("*.log"))
    assert logs, "the cluster keeps its process logs in its state directory"
    readable = [str(p) for p in logs if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not readable, readable


async def test_the_page_and_the_console_work_under_their_policies(cluster: Cluster, page: Page) -> None:
    """In Chromium: the public page and the console run (no CSP violation reported), and
    the console's Sign out revokes the session (a copy of the cookie is refused)."""
    from tests.test_console import signed_in

    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    base = gw(cluster, "west")
    await page.goto(f"{base}/")
    await expect(page.locator("button.event").first).to_be_attached(timeout=10_000)
    await signed_in(page, base)
    copied = next(c["value"] for c in await page.context.cookies() if c["name"] == COOKIE)
    await page.locator("#logout").click()
    await page.wait_for_url(f"{base}/operator/login", timeout=10_000)
    assert not violations, violations
    assert await status_with_cookie(f"{base}/admin/api/state", copied) == 401


async def test_the_session_cookie_is_secure_when_the_gateway_is_told_so(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """BOXOFFICE_COOKIE_SECURE=1 (a gateway behind TLS): the session cookie is `Secure`."""
    monkeypatch.setenv("BOXOFFICE_COOKIE_SECURE", "1")  # inherited by the gateway process
    with extra_gateway(cluster, "east", "secure-cookie") as base:
        async with aiohttp.ClientSession() as session, session.post(
                f"{base}/operator/login", data={"token": ADMIN_TOKEN}) as resp:
            assert resp.status == 204
            cookie = resp.cookies[COOKIE]
            assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Strict"
