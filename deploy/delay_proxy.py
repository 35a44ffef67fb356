"""Simulated distance and partitions: a TCP proxy that delays every byte by a fixed time
each way, and whose links can be cut and healed at run time.

`python -m deploy.delay_proxy [--control PORT] LISTEN_PORT:TARGET_PORT:DELAY_MS [...]`
runs one link per argument in a single process. Order and throughput are preserved;
only latency is added (like a long cable, not a slow one).

With `--control PORT` the proxy also listens (127.0.0.1) for one-line commands, each
answered with one JSON line:

    key KEY                 must be the connection's first line (not answered)
    cut PORT [PORT ...]     cut these links (by listen port)
    heal PORT [PORT ...]    heal them; `heal all` heals every link
    status                  {"links": {...}, "cut": [...]}

The control port is not for anyone who can reach 127.0.0.1 (every local user, and any
web page in a local browser, whose `fetch` POST can carry these lines in its body):
- the first line must be `key <the cluster's control key>` (compared in constant time;
  `boxoffice up` generates one per cluster and passes it in BOXOFFICE_PROXY_KEY, or a
  0600 file named by `--control-key-file`); a proxy with no key refuses every command;
- the proxy stops at the first line it does not understand (a wrong or missing key, an
  unknown command, anything that looks like HTTP, a line over 1 KiB, bytes that are not
  ASCII): it answers one error line and closes the connection, so nothing after it runs.
Tests: tests/test_delay_proxy.py (a browser's POST cuts nothing; the key is needed).

A cut link black-holes, as a network partition does: every connection through it,
open or new, is accepted (by the proxy: the client's connect succeeds) and then
hears nothing; bytes sent either way are read and dropped, nothing is closed, so a
peer learns of the cut only through its own timeouts. Healing a link resets (RST) the
connections that were black-holed, as TCP gives up on a connection that lost data,
so their peers reconnect at once, and new connections pass again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("boxoffice.delay_proxy")

CONTROL_KEY_ENV = "BOXOFFICE_PROXY_KEY"
MAX_CONTROL_LINE = 1024
_COMMAND = re.compile(r"[a-z]+( [0-9a-z]+)*")  # what a command line may look like at all
_HTTP = re.compile(r"^[A-Z]+ \S+ HTTP/|^[A-Za-z-]+:|HTTP/\d")


class ControlError(Exception):
    """A control line the proxy does not accept: answered once, then the connection ends."""


@dataclass(frozen=True)
class Link:
    listen_port: int
    target_port: int
    delay_ms: int

    @classmethod
    def parse(cls, spec: str) -> Link:
        listen, target, delay = spec.split(":")
        return cls(int(listen), int(target), int(delay))

    def spec(self) -> str:
        return f"{self.listen_port}:{self.target_port}:{self.delay_ms}"


@dataclass(eq=False)
class _Connection:
    """One client connection through a link (and its upstream one, once opened)."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    black_holed: bool = False  # was cut at some point: lost bytes, reset on heal
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        """Abort both sides (RST) and end the connection's handler."""
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()
        self.done.set()


@dataclass(eq=False)
class _LinkState:
    link: Link
    cut: bool = False
    connections: set[_Connection] = field(default_factory=set)


class Proxy:
    """Every link of one proxy process, with the switch that cuts and heals them."""

    def __init__(self, links: list[Link], control_key: str | None = None) -> None:
        self.links = {link.listen_port: _LinkState(link) for link in links}
        self.servers: list[asyncio.Server] = []
        self.control_key = control_key or None

    # -- control ---------------------------------------------------------------------
    def cut(self, ports: list[int]) -> list[int]:
        """Cut these links (unknown ports are ignored); the ports now cut."""
        for port in ports:
            state = self.links.get(port)
            if state is None or state.cut:
                continue
            state.cut = True
            for conn in state.connections:
                conn.black_holed = True
        return self.cut_ports()

    def heal(self, ports: list[int] | None = None) -> list[int]:
        """Heal these links (None: all); the ports still cut."""
        for port in self.links if ports is None else ports:
            state = self.links.get(port)
            if state is None or not state.cut:
                continue
            state.cut = False
            for conn in [c for c in state.connections if c.black_holed]:
                conn.reset()
                state.connections.discard(conn)
        return self.cut_ports()

    def cut_ports(self) -> list[int]:
        return sorted(p for p, s in self.links.items() if s.cut)

    def command(self, line: str) -> dict[str, object]:
        """Run one command line (without the key line); its answer. `ControlError` for a
        line that is not a command: the connection ends there."""
        if not _COMMAND.fullmatch(line):
            raise ControlError("not a command")
        verb, *args = line.split(" ")
        try:
            if verb == "cut" and args:
                return {"cut": self.cut([int(a) for a in args])}
            if verb == "heal" and args:
                return {"cut": self.heal(None if args == ["all"] else [int(a) for a in args])}
            if verb == "status" and not args:
                return {"links": {str(p): s.link.spec() for p, s in self.links.items()},
                        "cut": self.cut_ports(),
                        "connections": {str(p): len(s.connections) for p, s in self.links.items()}}
        except ValueError:
            raise ControlError("ports must be numbers") from None
        raise ControlError(f"unknown command {verb!r} (cut, heal, status)")

    def check_key(self, line: str) -> None:
        """The connection's first line: `key <control key>`, or `ControlError`."""
        if self.control_key is None:
            raise ControlError("this proxy has no control key: it takes no commands")
        word, _, given = line.partition(" ")
        if word != "key" or not hmac.compare_digest(given.encode(), self.control_key.encode()):
            raise ControlError("the first line must be 'key <control key>'")

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        authenticated = False
        try:
            while raw := await reader.readline():
                if len(raw) > MAX_CONTROL_LINE or not raw.endswith(b"\n") or not raw.isascii():
                    raise ControlError("not a command line")
                line = raw.decode("ascii").rstrip("\r\n")
                if _HTTP.search(line):
                    raise ControlError("this is not an HTTP server")
                if not authenticated:
                    self.check_key(line)
                    authenticated = True
                    continue
                writer.write(json.dumps(self.command(line)).encode() + b"\n")
                await writer.drain()
        except (ControlError, ValueError) as exc:  # ValueError: a line over the stream's limit
            log.warning("control connection refused", extra={"reason": str(exc)})
            with contextlib.suppress(ConnectionError):
                writer.write(json.dumps({"error": str(exc)}).encode() + b"\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    # -- forwarding ------------------------------------------------------------------
    async def _pump(self, conn: _Connection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, delay: float) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while True:
                try:
                    data = await reader.read(65536)
                except ConnectionError:
                    # The peer reset the connection: reset the other side too, as TCP
                    # would; otherwise that side hears nothing until its own timeout
                    # (a Consul watch through the proxy: its whole ~37 s budget).
                    if not conn.black_holed:  # a cut drops the reset like everything else
                        conn.reset()
                    return
                if conn.black_holed:  # the cut drops what crosses it, EOF included
                    if not data:
                        return
                    continue
                await queue.put((time.monotonic() + delay, data))
                if not data:
                    return

        receiver = asyncio.create_task(receive())
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the simulated wire delay itself
                if conn.black_holed:
                    continue  # in flight when the link was cut: lost
                if not data:
                    if writer.can_write_eof() and not writer.is_closing():
                        # (uvloop raises RuntimeError on a transport the peer already closed)
                        with contextlib.suppress(RuntimeError, ConnectionError):
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await receiver

    async def _until_done(self, conn: _Connection, *work: Coroutine[Any, Any, None]) -> None:
        """Run the coroutines until one ends (a direction closed or failed: the other
        follows once the writers close) or the connection is reset by a heal."""
        tasks = [asyncio.ensure_future(w) for w in work]
        done = asyncio.ensure_future(conn.done.wait())
        try:
            if len(tasks) == 2:  # two directions: wait for both to end normally
                both = asyncio.ensure_future(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
                await asyncio.wait({both, done}, return_when=asyncio.FIRST_COMPLETED)
                both.cancel()
            else:
                await asyncio.wait({*tasks, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, done):
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await task

    async def _handle(self, state: _LinkState, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        conn = _Connection(client_w, black_holed=state.cut)
        state.connections.add(conn)
        try:
            if conn.black_holed:
                # Made while the link is cut: swallow everything, answer nothing, until
                # the heal resets it (or the client gives up).
                async def swallow() -> None:
                    while await client_r.read(65536):
                        pass
                await self._until_done(conn, swallow())
                return
            try:
                server_r, server_w = await asyncio.open_connection("127.0.0.1", state.link.target_port)
            except OSError:
                return
            conn.server = server_w
            delay = state.link.delay_ms / 1000.0
            # Cut while open, the pumps drop what they read and a closing peer's EOF too,
            # so they may never end: the heal's reset ends the connection.
            await self._until_done(conn, self._pump(conn, client_r, server_w, delay),
                                   self._pump(conn, server_r, client_w, delay))
        finally:
            state.connections.discard(conn)
            if conn.black_holed:
                conn.reset()
            else:
                for w in (client_w, conn.server):
                    if w is not None:
                        w.close()

    async def serve(self, control_port: int | None = None) -> None:
        for port, state in self.links.items():
            self.servers.append(await asyncio.start_server(
                lambda r, w, state=state: self._handle(state, r, w), "127.0.0.1", port))
        if control_port is not None:
            self.servers.append(await asyncio.start_server(self._control, "127.0.0.1", control_port))
        await asyncio.gather(*(s.serve_forever() for s in self.servers))


async def serve(links: list[Link], control_port: int | None = None, control_key: str | None = None) -> None:
    await Proxy(links, control_key).serve(control_port)


def control(port: int, line: str, key: str, timeout: float = 5.0) -> dict[str, object]:
    """Send one command to a proxy's control port with its key (blocking); its JSON answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"key {key}\n{line}\n".encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if "error" in answer:
        raise ValueError(f"delay proxy: {answer['error']}")
    return dict(answer)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.delay_proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", type=int, default=None, metavar="PORT",
                        help="listen here for cut/heal/status commands")
    parser.add_argument("--control-key-file", type=Path, default=None, metavar="FILE",
                        help=f"the control key (default: ${CONTROL_KEY_ENV}); a file only its owner reads")
    parser.add_argument("links", nargs="+", type=Link.parse)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    key = os.environ.get(CONTROL_KEY_ENV, "")
    if args.control_key_file is not None:
        if args.control_key_file.stat().st_mode & 0o077:
            parser.error(f"{args.control_key_file} is readable by others: chmod 600 it")
        key = args.control_key_file.read_text().strip()
    if args.control is not None and len(key) < 32:
        parser.error(f"--control needs a control key of 32 characters or more "
                     f"(${CONTROL_KEY_ENV} or --control-key-file)")
    import uvloop

    uvloop.run(serve(args.links, args.control, key or None))


if __name__ == "__main__":
    main()
