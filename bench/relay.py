"""`python -m bench.relay --upstream URL`: a byte relay, the floor of any proxy on this placement.

It owns one thing: copying bytes. Each accepted connection gets its own connection to the
upstream, and whatever either side sends goes to the other as it came: no parsing, no
routing, no JSON, nothing a proxy must do. `bench.run` measures it beside the real proxies
(on the proxy's core, the backend and the probe where they are for them), so what it adds is
what a process in the middle costs on this box and placement by itself (two more loopback
hops, two more cross-core wake-ups per request), and what a proxy adds above it is its own
work. Flow control both ways: a side whose transport is over its high-water mark stops
reading the other side until it drains. uvloop, as meshnode runs; prints
`RELAY_HTTP=http://127.0.0.1:<port>` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

import uvloop


class _Side(asyncio.Protocol):
    """One end of a relayed connection; `peer` is the other end (None until it is connected)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # what arrived before the peer was connected
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Downstream(_Side):
    """A client's connection: opens its own upstream connection."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self._host, self._port = host, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Side, self._host, self._port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        if self.closed:
            upstream.transport.close()  # type: ignore[union-attr]
            return
        for data in self.pending:
            upstream.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()


async def serve(upstream: str, host: str, port: int) -> None:
    parts = urlsplit(upstream)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise SystemExit(f"bench.relay: --upstream must be http://HOST:PORT, got {upstream!r}")
    up_host, up_port = parts.hostname, parts.port
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Downstream(up_host, up_port), host, port)
    bound = server.sockets[0].getsockname()
    print(f"RELAY_HTTP=http://{bound[0]}:{bound[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT to relay to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
