"""Headless Chromium for the page tests, driven by Playwright (async API).

The fixtures reach every test module through `pytest_plugins` in tests/conftest.py:

- `chromium` (session): one headless Debian Chromium, `CHROMIUM`, handed to Playwright as
  `executable_path` (Playwright's own browser builds are never downloaded: no
  `playwright install`). Launched when the first test asks for a page, closed at the
  end of the session; Playwright's driver kills it too if the test run dies. Its sandbox
  is off (`--no-sandbox`), as Chromium refuses to start sandboxed as root, which the
  tests run as; the pages it opens are this project's own.
- `browser_context` (each test): a fresh context, as a new profile would be: no cookie,
  storage, init script or route of another test. Actions and waits give up after 5 s
  and navigations after 10 s unless a call says otherwise (`expect` waits 5 s too).
- `page` (each test): one page in that context.
- `page_errors` (each test): the page's uncaught exceptions (its `pageerror` events) as
  text; a test that wants a page free of script errors asserts it stays empty.

`wait_for(page, expression)` polls a JavaScript condition where no locator assertion
(`expect`) says it as exactly; unlike `page.wait_for_function` it works on a page whose
Content-Security-Policy forbids `eval` (see its docstring).

No network but the gateway's: `only_origin(context, origin)` makes a context abort, as
if the network were down, every request not for that origin (scheme, host and port),
and returns the list of URLs it refused. Route it before the page loads anything:

    async def test_docs_work_offline(browser_context: BrowserContext, page: Page) -> None:
        refused = await only_origin(browser_context, base)
        await page.goto(f"{base}/api/docs")
        ...
        assert refused == []  # nothing asked for outside the gateway

Playwright routes HTTP(S) requests only: WebSockets are not covered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/install.sh installs it)
ACTION_TIMEOUT_MS = 5_000
NAVIGATION_TIMEOUT_MS = 10_000
LOCAL_SCHEMES = ("data", "blob", "about")  # never leave the browser


@pytest.fixture(scope="session")
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, chromium_sandbox=False)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def browser_context(chromium: Browser) -> AsyncIterator[BrowserContext]:
    context = await chromium.new_context()
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    context.set_default_navigation_timeout(NAVIGATION_TIMEOUT_MS)
    try:
        yield context
    finally:
        await context.close()


@pytest.fixture
def page_errors() -> list[str]:
    """Filled by `page` with the uncaught exceptions of its scripts."""
    return []


@pytest.fixture
async def page(browser_context: BrowserContext, page_errors: list[str]) -> Page:
    page = await browser_context.new_page()
    page.on("pageerror", lambda error: page_errors.append(f"{error.name}: {error.message}"))
    return page


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


async def only_origin(context: BrowserContext, origin: str) -> list[str]:
    """Abort every request of `context` that is not for `origin` (as an unreachable
    network does) and return the list, filled as it happens, of the URLs refused."""
    allowed = origin_of(origin)
    refused: list[str] = []

    async def screen(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).scheme in LOCAL_SCHEMES or origin_of(url) == allowed:
            await route.fallback()  # to a route registered before this one, else the network
        else:
            refused.append(url)
            await route.abort("internetdisconnected")

    await context.route("**/*", screen)
    return refused


async def wait_for(page: Page, expression: str, timeout: float = 5.0) -> Any:
    """Poll a JavaScript expression (a promise is awaited) until its value is truthy in
    JavaScript; return that value. Fails with TimeoutError after `timeout` seconds.

    Not `page.wait_for_function`: that polls inside the page with `eval`, which a page whose
    Content-Security-Policy lacks 'unsafe-eval' (the operator console) refuses. Each
    `page.evaluate` here is a DevTools call, which that policy does not govern."""
    probe = f"(async () => {{ const v = await ({expression}); return {{truthy: !!v, value: v}}; }})()"
    deadline = time.monotonic() + timeout
    while True:
        result = await page.evaluate(probe)
        if result["truthy"]:
            return result["value"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"still falsy ({result['value']!r}) after {timeout}s: {expression}")
        await asyncio.sleep(0.05)  # poll interval
