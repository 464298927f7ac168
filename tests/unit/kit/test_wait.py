"""tests/kit/wait.py: the one polling helper every test waits with."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from tests.kit.wait import wait_for, wait_for_sync


def counter(truthy_at: int, value: object = "done") -> tuple[Callable[[], object], list[int]]:
    calls: list[int] = []

    def cond() -> object:
        calls.append(1)
        return value if len(calls) >= truthy_at else 0

    return cond, calls


async def test_returns_the_first_truthy_value_of_a_sync_condition() -> None:
    cond, calls = counter(3, {"b": "alive"})
    assert await wait_for(cond, "the third try") == {"b": "alive"}
    assert len(calls) == 3


async def test_awaits_an_async_condition() -> None:
    seen: list[int] = []

    async def cond() -> int:
        seen.append(1)
        await asyncio.sleep(0)
        return len(seen) if len(seen) >= 2 else 0

    assert await wait_for(cond, "two tries") == 2


async def test_the_timeout_names_what_and_the_last_value() -> None:
    values = iter(range(1000))
    with pytest.raises(AssertionError) as caught:
        await wait_for(lambda: [] if next(values) < 0 else {}, "b sees c dead", timeout=0.2)
    message = str(caught.value)
    assert "not within 0.2s: b sees c dead" in message
    assert "last value {}" in message


async def test_transient_errors_are_retried_and_reported() -> None:
    def cond() -> bool:
        raise ConnectionRefusedError("port 1 refused")

    with pytest.raises(AssertionError) as caught:
        await wait_for(cond, "the node listens", timeout=0.2)
    assert "last exception ConnectionRefusedError('port 1 refused')" in str(caught.value)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    flaky = iter([KeyError("c"), OSError("down"), None])

    def recovers() -> str:
        error = next(flaky)
        if error is not None:
            raise error
        return "up"

    assert await wait_for(recovers, "recovers") == "up"


async def test_other_errors_fail_at_once() -> None:
    calls: list[int] = []

    def broken() -> bool:
        calls.append(1)
        raise TypeError("a bug in the condition")

    with pytest.raises(TypeError):
        await wait_for(broken, "never", timeout=30)
    assert calls == [1]
    with pytest.raises(KeyError):
        await wait_for(lambda: {}["x"], "nothing ignored", timeout=30, ignoring=())


async def test_a_hanging_async_condition_is_bounded() -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    with pytest.raises(AssertionError, match="last exception TimeoutError"):
        await wait_for(hangs, "an answer", timeout=0.2)


async def test_what_may_be_built_only_on_timeout() -> None:
    built: list[int] = []

    def describe() -> str:
        built.append(1)
        return "log tail: boom"

    assert await wait_for(lambda: True, describe) is True
    assert built == []
    with pytest.raises(AssertionError, match="log tail: boom"):
        await wait_for(lambda: False, describe, timeout=0.1)
    assert built == [1]


def test_the_sync_wait_sees_another_thread() -> None:
    flag = threading.Event()
    timer = threading.Timer(0.05, flag.set)
    timer.start()
    try:
        assert wait_for_sync(flag.is_set, "the other thread sets the flag") is True
    finally:
        timer.cancel()
    with pytest.raises(AssertionError, match=r"not within 0.1s: never \(last value False\)"):
        wait_for_sync(lambda: False, "never", timeout=0.1)
    with pytest.raises(ValueError):
        wait_for_sync(lambda: True, "bad bound", timeout=0)
