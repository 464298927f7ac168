"""Frames survive the socketpair both ways: the worker's blocking end, the node's async end."""

from __future__ import annotations

import asyncio
import socket
import threading

from meshnode.worker.protocol import BlockingChannel, encode, read_frame


async def test_frames_round_trip_over_a_socketpair() -> None:
    node_sock, worker_sock = socket.socketpair()
    channel = BlockingChannel(worker_sock)
    reader, writer = await asyncio.open_unix_connection(sock=node_sock)
    vectors = bytes(range(256)) * 10
    worker_got: list[object] = []

    def worker() -> None:
        worker_got.append(channel.recv())
        channel.send({"t": "emb", "id": 1, "vectors": vectors, "dim": 640, "tokens": 3})
        channel.send({"t": "step", "ev": [[1, 0, "héllo", None]], "done": [[1, 2, 3]]})
        channel.close()

    thread = threading.Thread(target=worker)
    thread.start()
    writer.write(encode({"t": "gen", "id": 1, "params": {"stop": ["x"]}}))
    first = await read_frame(reader)
    second = await read_frame(reader)
    end = await read_frame(reader)
    thread.join()
    writer.close()
    assert worker_got == [{"t": "gen", "id": 1, "params": {"stop": ["x"]}}]
    assert first == {"t": "emb", "id": 1, "vectors": vectors, "dim": 640, "tokens": 3}
    assert second == {"t": "step", "ev": [[1, 0, "héllo", None]], "done": [[1, 2, 3]]}
    assert end is None
