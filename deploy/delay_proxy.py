"""Simulated distance: a TCP proxy that delays every byte by a fixed time each way.

`python -m deploy.delay_proxy LISTEN_PORT:TARGET_PORT:DELAY_MS [...]` runs one
link per argument in a single process. Order and throughput are preserved;
only latency is added (like a long cable, not a slow one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("boxoffice.delay_proxy")


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


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while True:
            data = await reader.read(65536)
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
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await receiver


async def _handle(link: Link, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    try:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", link.target_port)
    except OSError:
        client_w.close()
        return
    delay = link.delay_ms / 1000.0
    try:
        await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, delay))
    except (ConnectionError, OSError):
        pass
    finally:
        for w in (client_w, server_w):
            w.close()


async def serve(links: list[Link]) -> None:
    servers = []
    for link in links:
        servers.append(
            await asyncio.start_server(
                lambda r, w, link=link: _handle(link, r, w), "127.0.0.1", link.listen_port
            )
        )
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.delay_proxy", description=__doc__)
    parser.add_argument("links", nargs="+", type=Link.parse)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import uvloop

    uvloop.run(serve(args.links))


if __name__ == "__main__":
    main()
