"""The simulated distance between regions: a TCP proxy that adds latency, not loss."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from deploy.delay_proxy import Link, serve
from deploy.procs import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CONTROL_KEY = "k" * 43  # as `boxoffice up` makes one: secrets.token_urlsafe(32)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def proxied(handler: Handler, delays: Sequence[int],
                  control_port: int | None = None) -> AsyncIterator[list[Link]]:
    """A server running `handler`, behind one proxy link per delay (ms): the links. The
    proxy and the server are stopped afterwards."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    links = [Link(free_port(), server.sockets[0].getsockname()[1], d) for d in delays]
    proxy = asyncio.create_task(serve(links, control_port, CONTROL_KEY))
    try:
        yield links
    finally:
        proxy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await proxy
        server.close()
        await server.wait_closed()


async def test_proxy_delays_each_way_and_keeps_every_byte_in_order() -> None:
    async with proxied(_echo, [40]) as (link,):
        reader, writer = await _open(link.listen_port)
        payload = bytes(range(256)) * 4096  # 1 MiB
        started = time.monotonic()
        writer.write(payload)
        await writer.drain()
        received = await reader.readexactly(len(payload))
        round_trip = time.monotonic() - started
        assert received == payload
        assert round_trip >= 2 * link.delay_ms / 1000  # 40 ms out, 40 ms back
        writer.close()


def test_link_spec_round_trip() -> None:
    link = Link(1000, 2000, 35)
    assert Link.parse(link.spec()) == link


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = time.monotonic() + 5
    while True:  # until the proxy listens
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # poll interval


async def _silent(reader: asyncio.StreamReader, seconds: float = 0.3) -> bool:
    """Nothing arrives within `seconds` (and the connection is not closed)."""
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    return False


async def _reset(reader: asyncio.StreamReader) -> bool:
    """The connection ends (reset or closed) within a few seconds; False when it is still
    open then (TimeoutError is an OSError too: a hang must not count as a reset)."""
    try:
        data = await asyncio.wait_for(reader.read(65536), 5)
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
    return data == b""


async def _echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bool:
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload


async def test_a_cut_link_black_holes_open_and_new_connections_and_the_heal_resets_them() -> None:
    from deploy.delay_proxy import control

    control_port = free_port()
    async with proxied(_echo, [1, 0], control_port) as (cut_link, other_link):
        before_r, before_w = await _open(cut_link.listen_port)
        assert await _echoes(before_r, before_w, b"hello")
        other_r, other_w = await _open(other_link.listen_port)
        status = await asyncio.to_thread(control, control_port, f"cut {cut_link.listen_port}", CONTROL_KEY)
        assert status == {"cut": [cut_link.listen_port]}

        # The open connection hears nothing and is not closed: bytes are dropped.
        before_w.write(b"lost")
        await before_w.drain()
        assert await _silent(before_r)
        # A new one is accepted and hears nothing either (black hole, not refused).
        during_r, during_w = await asyncio.open_connection("127.0.0.1", cut_link.listen_port)
        during_w.write(b"into the void")
        await during_w.drain()
        assert await _silent(during_r)
        # Other links are not affected.
        assert await _echoes(other_r, other_w, b"still here")
        doc = await asyncio.to_thread(control, control_port, "status", CONTROL_KEY)
        assert doc["cut"] == [cut_link.listen_port]
        assert doc["links"] == {str(cut_link.listen_port): cut_link.spec(),
                                str(other_link.listen_port): other_link.spec()}

        healed = await asyncio.to_thread(control, control_port, "heal all", CONTROL_KEY)
        assert healed == {"cut": []}
        # What was black-holed is reset (its bytes are gone); new connections pass again.
        assert await _reset(before_r)
        assert await _reset(during_r)
        after_r, after_w = await _open(cut_link.listen_port)
        assert await _echoes(after_r, after_w, b"back")
        assert await _echoes(other_r, other_w, b"and this one never noticed")
        for w in (before_w, during_w, after_w, other_w):
            w.close()
        with pytest.raises(ValueError):
            await asyncio.to_thread(control, control_port, "cut nonsense", CONTROL_KEY)


async def test_a_reset_by_the_server_reaches_the_client() -> None:
    """A server that resets a connection (a process exiting with a request unread, as
    Consul can when stopped) must not leave the client through the proxy waiting: the
    proxy resets the client's side too, at once."""
    import socket
    import struct

    async def reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the request arrived; more of it stays unread
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # SO_LINGER 0: the close is a reset (RST)

    async with proxied(reset_after_request, [1]) as (link,):
        reader, writer = await _open(link.listen_port)
        writer.write(b"GET /v1/kv/map?index=7&wait=30s HTTP/1.1\r\n\r\n")
        await writer.drain()
        assert await _reset(reader), "the client still waits: the server's reset did not reach it"
        writer.close()


# -- the control port: a page in a browser cannot drive it (issue 21, item 6) ------------


async def _control_raw(port: int, data: bytes) -> bytes:
    """Send `data` to a control port as it is; everything the proxy answers before it
    closes the connection (or within 2 s, if it does not)."""
    reader, writer = await _open(port)
    writer.write(data)
    await writer.drain()
    answer = b""
    try:
        async with asyncio.timeout(2):
            while chunk := await reader.read(65536):
                answer += chunk
    except TimeoutError:
        pass
    except ConnectionError:
        answer += b"<reset>"
    writer.close()
    return answer


async def test_a_browser_post_to_the_control_port_cuts_nothing() -> None:
    """What a web page's `fetch(url, {method: "POST", body})` sends: an HTTP request
    whose body carries control lines. The proxy stops at its first line (not a command)
    and closes; nothing after it runs, so the link still carries bytes."""
    control_port = free_port()
    async with proxied(_echo, [0], control_port) as (link,):
        conn_r, conn_w = await _open(link.listen_port)
        assert await _echoes(conn_r, conn_w, b"before")
        body = f"key {CONTROL_KEY}\ncut {link.listen_port}\n".encode()
        request = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain;charset=UTF-8\r\n"
                   b"Origin: http://evil.example\r\nContent-Length: " + str(len(body)).encode()
                   + b"\r\n\r\n" + body)
        answer = await _control_raw(control_port, request)
        assert b'"cut"' not in answer, answer
        assert await _echoes(conn_r, conn_w, b"after: the link was not cut")
        conn_w.close()


async def test_the_control_port_needs_the_cluster_key_on_the_first_line() -> None:
    control_port = free_port()
    async with proxied(_echo, [0], control_port) as (link,):
        conn_r, conn_w = await _open(link.listen_port)
        for attempt in (f"cut {link.listen_port}\n",  # no key
                        f"key wrong-key\ncut {link.listen_port}\n",
                        f"status\nkey {CONTROL_KEY}\ncut {link.listen_port}\n",  # key not first
                        f"nonsense\ncut {link.listen_port}\n"):
            answer = await _control_raw(control_port, attempt.encode())
            assert b'"cut"' not in answer, (attempt, answer)
            assert await _echoes(conn_r, conn_w, b"not cut"), attempt
        # The key on the first line, then commands: they run.
        answer = await _control_raw(control_port, f"key {CONTROL_KEY}\ncut {link.listen_port}\n".encode())
        assert answer.startswith(b'{"cut": [' + str(link.listen_port).encode()), answer
        conn_w.write(b"lost")  # the open connection is black-holed now
        await conn_w.drain()
        assert await _silent(conn_r)
        conn_w.close()
