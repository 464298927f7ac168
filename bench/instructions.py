"""`python -m bench.instructions`: instructions per proxied request, counted by callgrind.

Wall-clock CPU figures move ±25 % on a shared box between runs minutes apart; an instruction
count does not. This runs the instant backend and one node (`bench.targets`' configuration)
with the node under `valgrind --tool=callgrind`, sends warm-up requests with the counter off,
then N requests in a row on one keep-alive connection with it on (each in one write), and prints the node's
instructions per request (everything the process executes: interpreter, C extensions, libc;
not the kernel). Run to run the figure moves by about a thousand; `--hash-seed` fixes
Python's string hashing, which removes most of that.

`--source DIR` measures another checkout's `meshnode` package (a worktree, an older commit's
`git worktree add`), so a change can be counted before and after on the same box.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from bench.procs import ProcessSet
from bench.targets import API_KEY, CHAT_PATH, REPO, chat_body, start_backend, start_meshnode

_TOTALS = re.compile(rb"^totals: (\d+)", re.MULTILINE)
# The head the official openai Python client (3.57) sends besides Host, Content-Type,
# Content-Length and Authorization: what a user's SDK costs the node, where wrk's and the
# default run's four-line head is the least a request can carry.
SDK_HEADERS = {
    "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive", "accept": "application/json",
    "user-agent": "OpenAI/Python 3.57.0", "x-stainless-lang": "python",
    "x-stainless-package-version": "3.57.0", "x-stainless-os": "Linux",
    "x-stainless-arch": "x64", "x-stainless-runtime": "CPython",
    "x-stainless-runtime-version": "3.11.7", "x-stainless-async": "false",
    "x-stainless-retry-count": "0", "x-stainless-read-timeout": "600",
}


def send_requests(url: str, body: bytes, count: int, extra: dict[str, str] | None = None) -> None:
    """`count` chat requests in a row on one keep-alive connection, each head and body in one
    write (as wrk sends them: a client that writes them apart makes the count depend on
    whether the node read them in one or two reads); each must answer 200."""
    parts = urlsplit(url)
    headers = {"Host": parts.netloc, "Content-Type": "application/json",
               "Authorization": f"Bearer {API_KEY}", **(extra or {}),
               "Content-Length": str(len(body))}
    request = (f"POST {CHAT_PATH} HTTP/1.1\r\n"
               + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
               + "\r\n").encode("latin-1") + body
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80),
                                  timeout=120) as sock:
        for _ in range(count):
            sock.sendall(request)
            response = http.client.HTTPResponse(sock)  # reads chunked and sized bodies
            response.begin()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"the node answered {response.status}: {answer[:300]!r}")


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def count(source: Path, *, stream: bool, requests: int, warmup: int,
          hash_seed: str | None, sdk_headers: bool = False) -> float:
    """Instructions the node executes per request, `requests` requests after `warmup`."""
    work_dir = Path(tempfile.mkdtemp(prefix="meshnode-instructions-"))
    out = work_dir / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}"]  # fmt: skip
    body = chat_body(stream=stream)
    extra = SDK_HEADERS if sdk_headers else None
    saved = os.environ.get("PYTHONHASHSEED")
    try:
        if hash_seed is not None:
            os.environ["PYTHONHASHSEED"] = hash_seed  # the node's environment inherits it
        with ProcessSet(work_dir / "logs") as procs:
            backend = start_backend(procs, None, 0.0)
            # Python under valgrind starts ~50x slower: a generous start-up bound.
            node = start_meshnode(procs, None, backend, work_dir, None, 600.0,
                                  source_dir=source, wrapper=valgrind)
            pid = str(node.process.pid)  # valgrind runs the program in its own process
            send_requests(node.base_url, body, warmup, extra)
            _control("-i", "on", pid)
            send_requests(node.base_url, body, requests, extra)
            _control("-i", "off", pid)
            _control("-d", pid)
        dumps = sorted(work_dir.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
        # The dump made on request (`-d`) holds the counted requests; the exit dump holds none.
        for dump in dumps:
            found = _TOTALS.search(dump.read_bytes())
            if found and int(found.group(1)) > 0:
                return int(found.group(1)) / requests
        raise RuntimeError(f"no callgrind dump with counted instructions in {work_dir}")
    finally:
        if saved is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = saved
        shutil.rmtree(work_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", action="store_true", help="count streamed requests")
    parser.add_argument("--requests", type=int, default=300, help="counted requests (300)")
    parser.add_argument("--warmup", type=int, default=50, help="requests before counting (50)")
    parser.add_argument("--source", type=Path, default=REPO,
                        help="the checkout whose meshnode package runs (this one)")
    parser.add_argument("--sdk-headers", action="store_true",
                        help="send the head the official openai Python client sends (17 lines)")
    parser.add_argument("--hash-seed", default="0",
                        help="PYTHONHASHSEED for the node (0); 'random' for Python's default")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: install valgrind (e.g. `apt-get install valgrind`)")
            return 2
    seed = None if args.hash_seed == "random" else args.hash_seed
    per_request = count(args.source.resolve(), stream=args.stream, requests=args.requests,
                        warmup=args.warmup, hash_seed=seed, sdk_headers=args.sdk_headers)
    kind = "streamed" if args.stream else "non-stream"
    head = "the openai SDK's head" if args.sdk_headers else "a four-line head"
    print(f"{per_request:,.0f} instructions per {kind} request with {head} "
          f"({args.requests} after {args.warmup}, meshnode from {args.source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
