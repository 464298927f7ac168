"""The one way tests wait: poll a condition until it holds, within a bound.

    from tests.kit.wait import wait_for, wait_for_sync

    await wait_for(lambda: table.status("b") is ALIVE, "a sees b alive")     # in an event loop
    views = await wait_for(fetch_views, "the mesh formed", timeout=60)       # async cond too
    wait_for_sync(lambda: ready(node.url), "the worker loaded", timeout=240)  # threads, processes

- `cond` is called at once, then again after a delay that starts at 10 ms and grows by half
  each round up to `interval`; the first truthy value is returned. `wait_for` awaits `cond()`
  when it returns an awaitable, bounded by the time left; `wait_for_sync` is for code with no
  loop to yield to (blocking process helpers, `asyncio.to_thread`).
- An exception of a type in `ignoring` means "not yet" (default: `OSError`, which covers a
  refused connection, `urllib.error.URLError` and `TimeoutError`, and `KeyError`, a member or
  announcement not there yet). Any other exception propagates at once: a bug in the condition
  should fail the test now, not after the bound.
- `timeout` defaults to 20 s for `wait_for` (in-process state) and 60 s for `wait_for_sync`
  (node processes starting, gossip across processes); pass a larger one where a step is slow.
- After `timeout` seconds: `AssertionError` naming `what` (a string, or a callable for text that
  is costly to build, like a log tail, made only then), the bound, and the last value or
  exception the condition gave (the exception is also chained as `__cause__`).

The bound is a cap for a broken test, never a claim about speed: no test asserts how long a wait
took. Do not write another polling loop in a test; give this one what it lacks.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

TRANSIENT: tuple[type[BaseException], ...] = (OSError, KeyError)
# In-process state moves in milliseconds, and 20 s stays under the 60 s pytest timeout of the
# mesh and rpc modules, so a stuck wait fails with its own message; processes need longer.
ASYNC_TIMEOUT_S = 20.0
SYNC_TIMEOUT_S = 60.0
FIRST_DELAY_S = 0.01
DEFAULT_INTERVAL_S = 0.1
_REPR_LIMIT = 2000

What = str | Callable[[], str]


async def wait_for(
    cond: Callable[[], T | Awaitable[T]],
    what: What,
    timeout: float = ASYNC_TIMEOUT_S,
    *,
    interval: float = DEFAULT_INTERVAL_S,
    ignoring: tuple[type[BaseException], ...] = TRANSIENT,
) -> T:
    """Poll `cond` (sync or async) until it is truthy; return that value."""
    poll = _Poll(timeout, interval)
    while True:
        try:
            result = cond()
            if inspect.isawaitable(result):
                async with asyncio.timeout(max(poll.left(), FIRST_DELAY_S)):
                    result = await result
            value: T = result  # type: ignore[assignment]
            if value:
                return value
            poll.saw(value)
        except ignoring as exc:
            poll.failed(exc)
        poll.check(what)
        await asyncio.sleep(poll.next_delay())


def wait_for_sync(
    cond: Callable[[], T],
    what: What,
    timeout: float = SYNC_TIMEOUT_S,
    *,
    interval: float = DEFAULT_INTERVAL_S,
    ignoring: tuple[type[BaseException], ...] = TRANSIENT,
) -> T:
    """Poll `cond` until it is truthy, sleeping the thread between tries; return that value."""
    poll = _Poll(timeout, interval)
    while True:
        try:
            value = cond()
            if value:
                return value
            poll.saw(value)
        except ignoring as exc:
            poll.failed(exc)
        poll.check(what)
        time.sleep(poll.next_delay())


class _Poll:
    """The bound, the growing delay and the last thing seen, shared by both waits."""

    def __init__(self, timeout: float, interval: float) -> None:
        if timeout <= 0 or interval <= 0:
            raise ValueError("timeout and interval must be > 0")
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.interval = interval
        self.delay = min(FIRST_DELAY_S, interval)
        self.last: str = "nothing yet"
        self.error: BaseException | None = None

    def left(self) -> float:
        return self.end - time.monotonic()

    def saw(self, value: object) -> None:
        self.last, self.error = f"last value {_short(value)}", None

    def failed(self, exc: BaseException) -> None:
        self.last, self.error = f"last exception {_short(exc)}", exc

    def check(self, what: What) -> None:
        if self.left() <= 0:
            text = what() if callable(what) else what
            raise AssertionError(f"not within {self.timeout:g}s: {text} ({self.last})") \
                from self.error

    def next_delay(self) -> float:
        delay = min(self.delay, max(self.left(), 0.0))
        self.delay = min(self.interval, self.delay * 1.5)
        return delay


def _short(value: object) -> str:
    text = repr(value)
    if len(text) > _REPR_LIMIT:
        return text[:_REPR_LIMIT] + f"... ({len(text)} characters)"
    return text
