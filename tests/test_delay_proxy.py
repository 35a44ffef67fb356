"""The simulated distance between regions: a TCP proxy that adds latency, not loss."""

from __future__ import annotations

import asyncio
import contextlib
import time

from deploy.delay_proxy import Link, serve
from deploy.procs import free_port


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_proxy_delays_each_way_and_keeps_every_byte_in_order() -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    link = Link(free_port(), echo_port, 40)
    proxy = asyncio.create_task(serve([link]))
    try:
        deadline = time.monotonic() + 5
        while True:  # wait until the proxy listens
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", link.listen_port)
                break
            except OSError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)  # poll interval
        payload = bytes(range(256)) * 4096  # 1 MiB
        started = time.monotonic()
        writer.write(payload)
        await writer.drain()
        received = await reader.readexactly(len(payload))
        round_trip = time.monotonic() - started
        assert received == payload
        assert round_trip >= 2 * link.delay_ms / 1000  # 40 ms out, 40 ms back
        writer.close()
    finally:
        proxy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await proxy
        echo.close()
        await echo.wait_closed()


def test_link_spec_round_trip() -> None:
    link = Link(1000, 2000, 35)
    assert Link.parse(link.spec()) == link
