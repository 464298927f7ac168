"""The local worker through a real node process and the official `openai` client (and the
`anthropic` one, for the stop sequence that fired)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.kit.node_proc import NodeProcess
from tests.kit.openai_schemas import validate
from tests.kit.wait import wait_for_sync

pytestmark = pytest.mark.slow

CONFIG = {
    "mesh": {"enabled": False},
    "providers": {
        "local": {
            "device": "cpu",
            "max_batch": 16,
            "models": [
                {"name": "tiny-gpt2", "builtin": "tiny-gpt2", "kind": "chat"},
                {"name": "minilm", "builtin": "minilm", "kind": "embedding"},
            ],
        }
    },
}


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=5) as r:  # noqa: S310
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(node: NodeProcess, timeout: float = 240.0) -> None:
    wait_for_sync(lambda: _ready(node.url),
                  lambda: f"the node's workers are ready\n{node.log_tail()}", timeout)


def _worker_pids(node_pid: int) -> list[int]:
    path = Path(f"/proc/{node_pid}/task/{node_pid}/children")
    return [int(p) for p in path.read_text().split()]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(CONFIG, tmp_path_factory.mktemp("local-node"), startup_timeout=120) as n:
        _wait_ready(n)
        yield n


async def test_sixteen_clients_stream_and_not_with_exact_max_tokens(node: NodeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[int, int, str | None]:
        wanted = 2 + i % 6
        messages = [{"role": "user", "content": f"hello {i}"}]
        if i % 2:
            answer = await client.chat.completions.create(
                model="tiny-gpt2", messages=messages, max_tokens=wanted)  # type: ignore[arg-type]
            assert answer.usage is not None
            return answer.usage.completion_tokens, wanted, answer.choices[0].finish_reason
        stream = await client.chat.completions.create(
            model="tiny-gpt2", messages=messages, max_tokens=wanted,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True})
        finish = None
        used = 0
        async for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return used, wanted, finish

    try:
        results = await asyncio.gather(*(one(i) for i in range(16)))
    finally:
        await client.close()
    assert all(got == wanted and finish == "length" for got, wanted, finish in results)


async def test_bad_sampling_value_is_a_400(node: NodeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="tiny-gpt2", messages=[{"role": "user", "content": "x"}],
                max_tokens=2, temperature=5)
    finally:
        await client.close()


async def test_embeddings_through_the_node(node: NodeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    try:
        answer = await client.embeddings.create(model="minilm", input=[
            "a cat sits on the mat", "a kitten rests on the rug",
            "quarterly tax filing deadlines"])
    finally:
        await client.close()
    v = [d.embedding for d in answer.data]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b))

    assert len(v[0]) == 384
    assert cos(v[0], v[1]) > cos(v[0], v[2])


async def test_killed_worker_gives_a_clean_error_and_comes_back(node: NodeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "go"}],
            max_tokens=400, stream=True)
        first = await stream.__anext__()
        assert first.choices
        [worker_pid] = _worker_pids(node.pid)
        os.kill(worker_pid, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        await asyncio.to_thread(_wait_ready, node)
        answer = await client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "again"}], max_tokens=3)
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        assert _worker_pids(node.pid) != [worker_pid]
    finally:
        await client.close()


# --------------------------------------------------------------------------- legacy completions
def _complete(node: NodeProcess, **body: Any) -> dict[str, Any]:
    client = openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(model="tiny-gpt2", **body)
    out: dict[str, Any] = json.loads(raw.content)
    validate("CreateCompletionResponse", out)
    assert out["system_fingerprint"].startswith("fp_")
    return out


def test_a_list_of_prompts_gets_n_choices_each_numbered_prompt_by_prompt(
    node: NodeProcess,
) -> None:
    prompts = ["once upon a time", "1, 2, 3, 4,"]
    alone = [_complete(node, prompt=p, max_tokens=6, temperature=0)["choices"][0]["text"]
             for p in prompts]
    assert alone[0] != alone[1]
    both = _complete(node, prompt=prompts, n=2, max_tokens=6, temperature=0)
    texts = {c["index"]: c["text"] for c in both["choices"]}
    assert sorted(texts) == [0, 1, 2, 3]
    # OpenAI numbers prompt by prompt: prompt 0's n choices first.
    assert [texts[0], texts[1], texts[2], texts[3]] == [alone[0], alone[0], alone[1], alone[1]]
    assert both["usage"]["completion_tokens"] == 4 * 6


def test_token_id_prompts_read_as_their_text(node: NodeProcess) -> None:
    from tokenizers import Tokenizer

    [folder] = (node.workdir / "node-data" / "models").glob("tiny-gpt2-*")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = ["the capital of France is", "hello there"]
    by_text = _complete(node, prompt=prompts, max_tokens=4, temperature=0)
    ids = [tokenizer.encode(p).ids for p in prompts]
    by_ids = _complete(node, prompt=ids, max_tokens=4, temperature=0)
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    one = _complete(node, prompt=ids[1], max_tokens=4, temperature=0)
    assert one["choices"][0]["text"] == by_text["choices"][1]["text"]
    client = openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    for bad in ([[1, 2, 1024]], [5, -1]):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny-gpt2", prompt=bad, max_tokens=1)
        assert info.value.body["param"] == "prompt"  # type: ignore[index]
        assert "vocabulary" in info.value.body["message"]  # type: ignore[index]


def test_max_tokens_zero_answers_nothing_with_finish_length(node: NodeProcess) -> None:
    out = _complete(node, prompt=["hello there", "bye"], max_tokens=0, n=2)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == [""] * 4
    assert {c["finish_reason"] for c in out["choices"]} == {"length"}
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] > 0
    client = openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    with client.completions.with_streaming_response.create(
        model="tiny-gpt2", prompt="hello", max_tokens=0, stream=True,
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    for chunk in chunks:
        # The published description has no stream schema for legacy completions: a chunk is
        # a CreateCompletionResponse whose finish_reason is null until the last (as OpenAI's).
        validate("CreateCompletionResponse", {**chunk, "choices": [
            {**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]})
        assert chunk["system_fingerprint"].startswith("fp_")
    finals = [c["finish_reason"] for chunk in chunks for c in chunk["choices"]
              if c["finish_reason"]]
    assert finals == ["length"]
    # A chat needs at least one token.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-gpt2", max_tokens=0,
                                       messages=[{"role": "user", "content": "x"}])
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_every_chat_body_and_chunk_fits_openais_schema(node: NodeProcess) -> None:
    client = openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-gpt2", messages=messages, max_tokens=3, n=2)  # type: ignore[arg-type]
    body = json.loads(raw.content)
    validate("CreateChatCompletionResponse", body)
    assert [c["message"]["refusal"] for c in body["choices"]] == [None, None]
    with client.chat.completions.with_streaming_response.create(
        model="tiny-gpt2", messages=messages, max_tokens=3, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        assert chunk["system_fingerprint"] == body["system_fingerprint"]
    assert chunks[0]["choices"][0]["delta"]["refusal"] is None


def test_a_fired_stop_sequence_is_named_on_the_anthropic_door(node: NodeProcess) -> None:
    """The worker says which stop string ended the answer; /v1/messages reports it as Anthropic
    does for its own models, streamed and not; OpenAI's answer keeps finish_reason "stop"."""
    client = anthropic.Anthropic(api_key="unused", base_url=node.url, max_retries=0, timeout=120)
    # Greedy (this SDK has no `temperature` argument any more; the door still reads it).
    ask: dict[str, Any] = {"model": "tiny-gpt2", "max_tokens": 12,
                           "extra_body": {"temperature": 0},
                           "messages": [{"role": "user", "content": "the end is near"}]}
    free = client.messages.create(**ask)
    assert (free.stop_reason, free.stop_sequence) == ("max_tokens", None)
    text = "".join(b.text for b in free.content if b.type == "text")
    # The tiny model answers newlines, then printable noise: stop on one of those.
    stop = next(c for c in text[2:] if c.isascii() and c.isprintable() and not c.isspace())
    message = client.messages.create(**ask, stop_sequences=["\x00never", stop])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert [b.text for b in message.content if b.type == "text"] == [text[:text.index(stop)]]
    with client.messages.stream(**ask, stop_sequences=["\x00never", stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    assert [b.text for b in final.content if b.type == "text"] == [text[:text.index(stop)]]
    chat = openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0).chat \
        .completions.create(model="tiny-gpt2", max_tokens=12, temperature=0, stop=[stop],
                            messages=[{"role": "user", "content": "the end is near"}])
    assert chat.choices[0].finish_reason == "stop"
    assert chat.choices[0].message.content == text[:text.index(stop)]
