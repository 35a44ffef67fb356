"""A small Chrome DevTools Protocol client: a real headless chromium for page tests.

Chromium runs as a `ManagedProcess` (its own session, a parent-death signal,
always stopped and reaped). Its page target is driven over one websocket:
every command carries an id and its reply is awaited. Of the events, uncaught
page exceptions are kept in `Browser.errors`; `on` subscribes a handler to
others (`lose_responses` uses it to cut answers off on their way back).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from deploy.procs import ManagedProcess, free_port

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

Handler = Callable[[dict[str, Any]], Awaitable[None]]  # called with a CDP event's params


class BrowserError(RuntimeError):
    """A CDP command failed, or JavaScript threw."""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """One headless chromium with one page. Use as `async with Browser() as b:`."""

    def __init__(self, executable: str | None = None, startup_timeout: float = 30.0) -> None:
        found = executable or find_chromium()
        if found is None:
            raise BrowserError(f"no browser on PATH (tried {', '.join(CANDIDATES)}); "
                               "run scripts/install.sh")
        self.executable = found
        self.startup_timeout = startup_timeout
        self.errors: list[str] = []
        self._dir = Path(tempfile.mkdtemp(prefix="boxoffice-chromium-"))
        self._port = free_port()
        self._process = ManagedProcess(
            "chromium",
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking",
             f"--remote-debugging-port={self._port}", f"--user-data-dir={self._dir / 'profile'}",
             "about:blank"],
            self._dir / "chromium.log",
        )
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str, list[Handler]] = {}
        self._handling: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> Browser:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        self._process.start()
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(await self._page_ws_url(), max_msg_size=0)
        self._reader = asyncio.create_task(self._read_loop())
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        await asyncio.to_thread(self._stop_process)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _stop_process(self) -> None:
        """Stop chromium (reaped), then kill its helpers, its process group, which
        would otherwise linger for a second or two after it."""
        pgid = self._process.pid
        self._process.stop(10.0)
        if pgid is None:
            return
        with contextlib.suppress(ProcessLookupError):  # already gone: nothing to do
            os.killpg(pgid, signal.SIGKILL)

    async def _page_ws_url(self) -> str:
        """Poll the DevTools HTTP endpoint until the page target is listed."""
        assert self._session is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://127.0.0.1:{self._port}/json/list"
        while True:
            try:
                async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    targets = await resp.json(content_type=None)
                for target in targets:
                    if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                        return str(target["webSocketDebuggerUrl"])
            except (TimeoutError, aiohttp.ClientError, ValueError):
                pass
            if not self._process.running():
                raise BrowserError(f"chromium exited at start:\n{self._process.log_tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium not ready after {self.startup_timeout:.0f}s:\n"
                                   f"{self._process.log_tail()}")
            await asyncio.sleep(0.05)  # poll interval

    async def _read_loop(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.errors.append(_describe(details))
            else:
                for handler in list(self._listeners.get(data.get("method", ""), [])):
                    # A task: a handler sends commands, whose replies this loop reads.
                    task = asyncio.create_task(handler(data.get("params", {})))
                    self._handling.add(task)
                    task.add_done_callback(self._handled)
        for future in self._pending.values():  # the connection is gone
            if not future.done():
                future.set_exception(BrowserError("DevTools connection closed"))
        self._pending.clear()

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._handling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(f"event handler failed: {task.exception()!r}")

    def on(self, method: str, handler: Handler) -> Callable[[], None]:
        """Call `handler(params)` for every `method` event; returns the unsubscriber."""
        self._listeners.setdefault(method, []).append(handler)
        return lambda: self._listeners[method].remove(handler)

    # -- commands ----------------------------------------------------------------
    async def send(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        """Send one CDP command and return its result (raise on a protocol error)."""
        assert self._ws is not None, "browser not started"
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        await self._ws.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
        try:
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(command_id, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (awaiting a promise) and return its JSON value."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {_describe(result['exceptionDetails'])}")
        return result["result"].get("value")

    async def navigate(self, url: str, timeout: float = 10.0) -> None:
        """Open `url` (even the one already open) and wait until its new document has loaded."""
        await self.evaluate("window.__leaving = true")  # gone once the new document is there
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        await self.wait_for(
            f"!window.__leaving && location.href === {json.dumps(url)}"
            " && document.readyState === 'complete'", timeout
        )

    async def lose_responses(self, url_pattern: str, count: int = 1) -> list[int]:
        """Let the next `count` requests matching `url_pattern` (CDP wildcards) reach the
        server, then drop the server's answer and reset the page's connection: the
        page's fetch fails after the server acted, as when an answer is lost on the
        way back. Returns a list that fills with the status codes the page never saw."""
        lost: list[int] = []

        async def paused(params: dict[str, Any]) -> None:
            if len(lost) >= count:  # not ours to drop: let it through
                await self.send("Fetch.continueRequest", requestId=params["requestId"])
                return
            lost.append(int(params.get("responseStatusCode", 0)))
            await self.send("Fetch.failRequest", requestId=params["requestId"],
                            errorReason="ConnectionReset")
            if len(lost) == count:
                unsubscribe()
                await self.send("Fetch.disable")

        unsubscribe = self.on("Fetch.requestPaused", paused)
        await self.send("Fetch.enable", patterns=[{"urlPattern": url_pattern, "requestStage": "Response"}])
        return lost

    async def before_page_scripts(self, source: str) -> None:
        """Run `source` in every document this page loads from now on, before its own scripts."""
        await self.send("Page.addScriptToEvaluateOnNewDocument", source=source)

    async def wait_for(self, expression: str, timeout: float = 5.0) -> Any:
        """Poll a JavaScript expression until it is truthy (in JavaScript); return its value."""
        deadline = time.monotonic() + timeout
        probe = f"(async () => {{ const v = await ({expression}); return {{truthy: !!v, value: v}}; }})()"
        while True:
            result = await self.evaluate(probe)
            value = result.get("value")
            if result["truthy"]:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still falsy ({value!r}) after {timeout}s: {expression}")
            await asyncio.sleep(0.05)  # poll interval

    # -- a few page helpers --------------------------------------------------------
    async def click(self, selector: str) -> None:
        """Click the centre of an element with the mouse, as a user would."""
        box = await self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return null;
            el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
        }})()""")
        if box is None:
            raise BrowserError(f"no element matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"],
                            button="left", clickCount=1)

    async def fill(self, selector: str, value: str) -> None:
        """Set an input's value the way typing does (an `input` event follows)."""
        found = await self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return false;
            el.focus();
            el.value = {json.dumps(value)};
            el.dispatchEvent(new Event("input", {{bubbles: true}}));
            el.dispatchEvent(new Event("change", {{bubbles: true}}));
            return true;
        }})()""")
        if not found:
            raise BrowserError(f"no element matches {selector!r}")

    async def text(self, selector: str) -> str | None:
        return await self.evaluate(
            f"document.querySelector({json.dumps(selector)})?.textContent ?? null"
        )


def _describe(details: dict[str, Any]) -> str:
    exception = details.get("exception") or {}
    return str(exception.get("description") or details.get("text") or details)
