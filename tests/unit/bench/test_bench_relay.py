"""`bench.relay`, the byte relay the bench measures as the floor of a proxy: a real relay
process between a real client and a real upstream on loopback, bytes both ways unchanged,
and a closed side closes the other."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


async def _start_relay(upstream: str) -> tuple[asyncio.subprocess.Process, str, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.relay", "--upstream", upstream, "--port", "0",
        cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    match = re.fullmatch(r"RELAY_HTTP=http://(127\.0\.0\.1):(\d+)\n", line)
    assert match, line
    return proc, match.group(1), int(match.group(2))


async def test_the_relay_copies_bytes_both_ways_and_closes_the_other_side() -> None:
    seen: asyncio.Queue[bytes] = asyncio.Queue()
    upstream_closed = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await seen.put(data)
            writer.write(b"echo:" + data)
            await writer.drain()
        upstream_closed.set()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc, host, relay_port = await _start_relay(f"http://127.0.0.1:{port}")
    try:
        reader, writer = await asyncio.open_connection(host, relay_port)
        # Sent at once on connecting: it may arrive before the relay's upstream connection is
        # up, and must be held, not dropped.
        writer.write(b"first\r\n")
        assert await asyncio.wait_for(reader.readexactly(12), 10) == b"echo:first\r\n"
        big = bytes(range(256)) * 4096  # 1 MiB: many reads, flow control on the way
        writer.write(big)
        got = bytearray()
        while len(got.replace(b"echo:", b"")) < len(big):
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert chunk
            got += chunk
        # Each upstream read came back behind its own "echo:" (the bytes hold no such run).
        assert got.replace(b"echo:", b"") == big
        received = b""
        while not seen.empty():
            received += seen.get_nowait()
        assert received == b"first\r\n" + big  # every byte reached the upstream, in order
        writer.close()
        await asyncio.wait_for(upstream_closed.wait(), 10)  # the client left: upstream closed
    finally:
        proc.terminate()
        await proc.wait()
        server.close()


async def test_the_relay_refuses_an_upstream_that_is_not_http_host_port() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.relay", "--upstream", "ftp://example", cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert b"--upstream must be http://HOST:PORT" in err

