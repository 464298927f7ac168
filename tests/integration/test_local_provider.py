"""LocalProvider against real worker processes: chat, completions and embeddings, streamed and
whole, concurrency, limits, bad values, overflow, and supervision (killed and hung workers)."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from meshnode.config import ProviderConfig, ResolvedProvider, TimeoutsConfig
from meshnode.errors import (
    ConfigError,
    InvalidRequest,
    StreamBroken,
    UpstreamError,
    UpstreamUnavailable,
)
from meshnode.providers.local import LocalProvider
from meshnode.providers.registry import ProviderContext
from meshnode.types import InferenceRequest, ModelOffer, RequestKind, StreamChunk
from tests.kit.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

TIMEOUTS = TimeoutsConfig()
READY_WAIT_S = 240.0


def _provider(data_dir: Path, models: list[dict[str, Any]], **kwargs: Any) -> LocalProvider:
    config = ProviderConfig.model_validate(
        {"device": "cpu", "max_batch": 16, "max_queue": 8, "models": models})
    resolved = ResolvedProvider(name="local", type="local", config=config)
    ctx = ProviderContext(node_id="test", data_dir=data_dir, timeouts=TIMEOUTS)
    return LocalProvider(resolved, ctx, threads=1, **kwargs)


async def _wait_ready(provider: LocalProvider) -> None:
    await wait_for(lambda: provider.ready()[0],
                   lambda: f"the workers are ready: {provider.ready()[1]}", READY_WAIT_S)


def _request(kind: RequestKind, body: dict[str, Any], stream: bool = False) -> InferenceRequest:
    return InferenceRequest(kind=kind, model=body.get("model", ""), body=body,
                            request_id="t", deadline=time.monotonic() + 120, stream=stream)


def _chat(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens, **extra}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalProvider]:
    data_dir = tmp_path_factory.mktemp("local-data")
    provider = _provider(data_dir, [
        {"name": "tiny-gpt2", "builtin": "tiny-gpt2", "kind": "chat"},
        {"name": "minilm", "builtin": "minilm", "kind": "embedding"},
        # The same weights declared Matryoshka: `dimensions` is then cut and renormalised.
        {"name": "minilm-m", "builtin": "minilm", "kind": "embedding", "matryoshka": True},
    ], hang_timeout_s=3.0, backoff_initial_s=0.2)
    assert provider.ready()[0] is False
    await provider.start()
    assert provider.ready()[0] is False  # start() returns before warm-up
    await _wait_ready(provider)
    yield provider
    await provider.close()


def _offer(provider: LocalProvider, model: str) -> ModelOffer:
    return next(o for o in provider.offers() if o.model == model)


async def _collect(provider: LocalProvider, request: InferenceRequest) -> list[StreamChunk]:
    return [c async for c in provider.stream(request, _offer(provider, request.model), TIMEOUTS)]


async def test_offers_are_free_and_typed(provider: LocalProvider) -> None:
    chat, emb = _offer(provider, "tiny-gpt2"), _offer(provider, "minilm")
    assert chat.kinds == {RequestKind.CHAT, RequestKind.COMPLETION}
    assert emb.kinds == {RequestKind.EMBEDDING}
    assert chat.cost_per_1k_input == chat.cost_per_1k_output == 0.0
    capacity = provider.capacity()
    assert capacity.slots_total == 16 and capacity.slots_free == 16
    assert capacity.memory_used_bytes > 0


async def test_chat_non_stream(provider: LocalProvider) -> None:
    body = _chat(7)
    result = await provider.complete(_request(RequestKind.CHAT, body), _offer(
        provider, "tiny-gpt2"), TIMEOUTS)
    assert result.body["object"] == "chat.completion"
    [choice] = result.body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens > 3  # the chat template wrapped the message
    assert result.body["usage"]["total_tokens"] == result.usage.total_tokens


async def test_chat_stream_shape_and_usage(provider: LocalProvider) -> None:
    chunks = await _collect(provider, _request(RequestKind.CHAT, _chat(9), stream=True))
    assert all(c.data["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0].data["choices"][0]["delta"]["role"] == "assistant"
    finish = chunks[-2].data["choices"][0]
    assert finish["finish_reason"] == "length" and finish["delta"] == {}
    assert chunks[-1].data["choices"] == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].data["usage"]["completion_tokens"] == 9
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.data["id"] for c in chunks}) == 1


def _stop_in(text: str) -> str:
    """A character the greedy answer emits past its start (the tiny model's text is noise; for
    "the end is near" it is newlines, then printable characters)."""
    return next(c for c in text[2:] if c.isascii() and c.isprintable() and not c.isspace())


async def test_the_stop_string_that_fired_is_named_streamed_and_not(
        provider: LocalProvider) -> None:
    offer = _offer(provider, "tiny-gpt2")
    messages = [{"role": "user", "content": "the end is near"}]
    plain = {"model": "tiny-gpt2", "messages": messages, "max_tokens": 12, "temperature": 0}
    free = await provider.complete(_request(RequestKind.CHAT, plain), offer, TIMEOUTS)
    [choice] = free.body["choices"]
    assert "stop_reason" not in choice  # OpenAI's shape when no stop string ended it
    text = choice["message"]["content"]
    stop = _stop_in(text)
    body = {**plain, "stop": ["\x00never", stop]}
    whole = await provider.complete(_request(RequestKind.CHAT, body), offer, TIMEOUTS)
    [choice] = whole.body["choices"]
    assert choice["message"]["content"] == text[:text.index(stop)]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    chunks = await _collect(provider, _request(RequestKind.CHAT, body, stream=True))
    finish = chunks[-2].data["choices"][0]
    assert (finish["finish_reason"], finish["stop_reason"]) == ("stop", stop)
    assert all("stop_reason" not in c for chunk in chunks[:-2] for c in chunk.data["choices"])
    # Completions too, whole and streamed.
    prompt = {"model": "tiny-gpt2", "prompt": "The", "max_tokens": 12, "temperature": 0}
    free = await provider.complete(_request(RequestKind.COMPLETION, prompt), offer, TIMEOUTS)
    stop = _stop_in(free.body["choices"][0]["text"])
    prompt["stop"] = stop
    whole = await provider.complete(_request(RequestKind.COMPLETION, prompt), offer, TIMEOUTS)
    assert whole.body["choices"][0]["stop_reason"] == stop
    chunks = await _collect(provider, _request(RequestKind.COMPLETION, prompt, stream=True))
    assert chunks[-2].data["choices"][0]["stop_reason"] == stop


async def test_completion_stream_with_n_and_seed_is_reproducible(provider: LocalProvider) -> None:
    body = {"model": "tiny-gpt2", "prompt": "once upon", "max_tokens": 5, "n": 2, "seed": 42,
            "temperature": 0.8}

    async def texts() -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in await _collect(provider, _request(RequestKind.COMPLETION, body, True)):
            assert chunk.data["object"] == "text_completion"
            for choice in chunk.data["choices"]:
                out[choice["index"]] = out.get(choice["index"], "") + choice["text"]
        return out

    first = await texts()
    assert set(first) == {0, 1}
    assert await texts() == first


async def test_sixteen_at_once_each_get_exact_max_tokens(provider: LocalProvider) -> None:
    offer = _offer(provider, "tiny-gpt2")

    async def one(i: int) -> tuple[int, int]:
        body = _chat(3 + i % 5, temperature=1.0)
        if i % 2:
            result = await provider.complete(_request(RequestKind.CHAT, body), offer, TIMEOUTS)
            return result.usage.completion_tokens, 3 + i % 5
        chunks = await _collect(provider, _request(RequestKind.CHAT, body, True))
        usage = chunks[-1].usage
        assert usage is not None
        return usage.completion_tokens, 3 + i % 5

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert all(got == wanted for got, wanted in results)


async def test_bad_sampling_values_are_invalid_requests(provider: LocalProvider) -> None:
    offer = _offer(provider, "tiny-gpt2")
    for bad in ({"temperature": 3}, {"top_p": 0}, {"n": 0}, {"max_tokens": -1}):
        with pytest.raises(InvalidRequest) as info:
            await provider.complete(_request(RequestKind.CHAT, {**_chat(2), **bad}), offer,
                                    TIMEOUTS)
        assert info.value.status == 400 and not info.value.retryable


async def test_over_the_context_is_an_invalid_request(provider: LocalProvider) -> None:
    with pytest.raises(InvalidRequest) as info:
        await provider.complete(_request(RequestKind.CHAT, _chat(100_000)),
                                _offer(provider, "tiny-gpt2"), TIMEOUTS)
    assert info.value.param == "max_tokens"


async def test_a_completion_prompt_over_the_context_names_prompt(
    provider: LocalProvider,
) -> None:
    body = {"model": "tiny-gpt2", "prompt": ["fine", "word " * 600], "max_tokens": 2}
    with pytest.raises(InvalidRequest) as info:
        await provider.complete(_request(RequestKind.COMPLETION, body),
                                _offer(provider, "tiny-gpt2"), TIMEOUTS)
    assert info.value.param == "prompt"
    assert provider.workers[0].slots_busy == 0  # the other prompt's call was let go too


async def test_embeddings_are_real(provider: LocalProvider) -> None:
    body = {"model": "minilm", "input": ["a cat sits on the mat", "a kitten rests on the rug",
                                         "quarterly tax filing deadlines"]}
    result = await provider.complete(_request(RequestKind.EMBEDDING, body),
                                     _offer(provider, "minilm"), TIMEOUTS)
    vectors = [d["embedding"] for d in result.body["data"]]
    assert [d["index"] for d in result.body["data"]] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.2
    assert result.usage.prompt_tokens == result.body["usage"]["prompt_tokens"] > 3


async def test_a_repeated_long_prompt_reuses_its_prefix(provider: LocalProvider) -> None:
    offer = _offer(provider, "tiny-gpt2")
    system = " ".join(f"rule{i % 41}" for i in range(50))

    def body(question: str) -> dict[str, Any]:
        return {"model": "tiny-gpt2", "max_tokens": 3, "temperature": 0.0,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": question}]}

    first = await provider.complete(_request(RequestKind.CHAT, body("first?")), offer, TIMEOUTS)
    second = await provider.complete(_request(RequestKind.CHAT, body("and second?")), offer,
                                     TIMEOUTS)
    assert first.usage.prompt_tokens > 256
    cached = second.usage.cached_tokens
    assert cached >= 256 and cached % 16 == 0 and cached > first.usage.cached_tokens
    details = second.body["usage"]["prompt_tokens_details"]
    assert details == {"cached_tokens": second.usage.cached_tokens}
    await wait_for(lambda: provider.capacity().prefix_blocks,  # the next heartbeat carries them
                   "held prefix blocks in capacity()")
    # The routing names of what it served, as the router computes them, come with the capacity
    # (the worker ties them to the blocks it holds: routing follows its evictions).
    from meshnode.routing.prefix import request_prefix

    served = request_prefix("tiny-gpt2", body("and second?")).chain
    assert served
    await wait_for(lambda: set(served) <= provider.capacity().prefix_names,
                   "the served prompt's routing names in capacity()")
    recent = provider.capacity().prefix_recent
    assert recent is not None and recent[0] == served[0]
    # The worker measured its prefill and decode speed on these steps (warm-up excluded).
    await wait_for(lambda: provider.capacity().prefill_tokens_per_s > 0
                   and provider.capacity().decode_tokens_per_s > 0,
                   "measured prefill and decode speeds in capacity()")


async def test_an_out_of_memory_step_fails_only_its_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshnode.worker.engine import INJECT_OOM_ENV

    monkeypatch.setenv(INJECT_OOM_ENV, "1")
    provider = _provider(tmp_path, [{"name": "tiny-gpt2", "builtin": "tiny-gpt2",
                                     "kind": "chat"}])
    await provider.start()
    try:
        await _wait_ready(provider)
        offer = _offer(provider, "tiny-gpt2")
        with pytest.raises(UpstreamUnavailable) as info:
            await provider.complete(_request(RequestKind.CHAT, _chat(4)), offer, TIMEOUTS)
        assert info.value.code == "local_out_of_memory" and info.value.retryable
        result = await provider.complete(_request(RequestKind.CHAT, _chat(4)), offer, TIMEOUTS)
        assert result.usage.completion_tokens == 4  # the same worker serves the next one
        assert provider.ready()[0]
    finally:
        await provider.close()


async def test_dimensions_cut_and_renormalise_on_a_matryoshka_model(
    provider: LocalProvider,
) -> None:
    texts = ["a cat sits on the mat", "quarterly tax filing deadlines"]
    full = await provider.complete(
        _request(RequestKind.EMBEDDING, {"model": "minilm-m", "input": texts}),
        _offer(provider, "minilm-m"), TIMEOUTS)
    short = await provider.complete(
        _request(RequestKind.EMBEDDING, {"model": "minilm-m", "input": texts,
                                         "dimensions": 64, "encoding_format": "base64"}),
        _offer(provider, "minilm-m"), TIMEOUTS)
    for whole, cut in zip(full.body["data"], short.body["data"], strict=True):
        raw = base64.b64decode(cut["embedding"])
        values = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert len(values) == 64
        assert math.isclose(math.sqrt(sum(v * v for v in values)), 1.0, rel_tol=1e-5)
        head = whole["embedding"][:64]
        norm = math.sqrt(sum(v * v for v in head))
        assert all(math.isclose(a, b / norm, rel_tol=1e-4, abs_tol=1e-6)
                   for a, b in zip(values, head, strict=True))
    for model, dims in (("minilm", 64), ("minilm-m", 385)):
        with pytest.raises(InvalidRequest) as info:
            await provider.complete(
                _request(RequestKind.EMBEDDING, {"model": model, "input": "x",
                                                 "dimensions": dims}),
                _offer(provider, model), TIMEOUTS)
        assert info.value.param == "dimensions"


async def test_a_full_queue_overflows_with_a_retryable_error(provider: LocalProvider) -> None:
    offer = _offer(provider, "tiny-gpt2")
    # 16 slots + 8 queued = 24 sequences; n=16 twice fills 32 > 24 on the second.
    first = asyncio.create_task(provider.complete(
        _request(RequestKind.CHAT, _chat(40, n=16)), offer, TIMEOUTS))
    await asyncio.sleep(0)
    await wait_for(lambda: provider.capacity().slots_free == 0, "the first call fills every slot")
    with pytest.raises(UpstreamUnavailable) as info:
        await provider.complete(_request(RequestKind.CHAT, _chat(2, n=16)), offer, TIMEOUTS)
    assert info.value.code == "local_queue_full" and info.value.retryable
    assert (await first).usage.completion_tokens == 16 * 40


async def test_client_going_away_cancels_generation(provider: LocalProvider) -> None:
    stream = provider.stream(_request(RequestKind.CHAT, _chat(400), True),
                             _offer(provider, "tiny-gpt2"), TIMEOUTS)
    await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    worker = provider.workers[0]
    assert worker.slots_busy == 0
    await wait_for(lambda: not worker.heartbeat.active, "the worker dropped the row", 60)


async def test_killed_worker_mid_stream_breaks_cleanly_and_comes_back(
    provider: LocalProvider,
) -> None:
    worker = provider.workers[0]
    old_pid = worker.pid
    stream = provider.stream(_request(RequestKind.CHAT, _chat(400), True),
                             _offer(provider, "tiny-gpt2"), TIMEOUTS)
    await stream.__anext__()
    pending = asyncio.create_task(provider.complete(
        _request(RequestKind.CHAT, _chat(400)), _offer(provider, "tiny-gpt2"), TIMEOUTS))
    await asyncio.sleep(0.05)
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(StreamBroken):
        async for _ in stream:
            pass
    with pytest.raises(UpstreamUnavailable) as info:  # nothing streamed: the router fails over
        await pending
    assert info.value.retryable
    await _wait_ready(provider)
    assert worker.pid != old_pid and worker.restarts >= 1
    result = await provider.complete(_request(RequestKind.CHAT, _chat(3)),
                                     _offer(provider, "tiny-gpt2"), TIMEOUTS)
    assert result.usage.completion_tokens == 3


async def test_hung_worker_is_killed_and_restarted(provider: LocalProvider) -> None:
    worker = provider.workers[0]
    old_pid = worker.pid
    assert old_pid is not None
    pending = asyncio.create_task(provider.complete(
        _request(RequestKind.CHAT, _chat(400)), _offer(provider, "tiny-gpt2"), TIMEOUTS))
    await asyncio.sleep(0.05)
    os.kill(old_pid, signal.SIGSTOP)  # frozen: no heartbeats (hang_timeout_s=3 here)
    with pytest.raises(UpstreamError):
        await pending
    assert "hung" in worker.last_error or worker.pid != old_pid
    await _wait_ready(provider)
    assert worker.pid != old_pid


async def test_missing_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _provider(tmp_path, [{"name": "m", "path": str(tmp_path / "nope"), "kind": "chat"}])
    assert "providers.local.models[0].path" in info.value.errors[0]
    with pytest.raises(ConfigError):
        _provider(tmp_path, [{"name": "m", "builtin": "minilm", "kind": "chat"}])
