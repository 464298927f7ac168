"""Constrained decoding, tool calls and logprobs on a local model, through a real node process
and the official `openai` client. The model is the random-weight tiny-gpt2: whatever it would
write, a constrained answer must parse and validate."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for_sync

pytestmark = pytest.mark.slow

MODEL = "tiny-gpt2"
CONFIG = {
    "mesh": {"enabled": False},
    # Off so that every request, streamed or not, is generated (not replayed from the cache).
    "cache": {"enabled": False},
    "providers": {"local": {"device": "cpu", "max_batch": 16, "models": [
        {"name": MODEL, "builtin": "tiny-gpt2", "kind": "chat"}]}},
}
SHAPE = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["circle", "square"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["kind", "size", "tags"],
    "additionalProperties": False,
}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
# One small tool: tiny-gpt2's byte tokenizer and 512-token context must hold the tool prompt
# (several tools in one grammar are covered in tests/unit/worker/test_constrained.py).
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS}},
]
MESSAGES: list[Any] = [{"role": "user", "content": "Describe a shape."}]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=5) as r:  # noqa: S310
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(CONFIG, tmp_path_factory.mktemp("decoding-node"),
                     startup_timeout=120) as n:
        wait_for_sync(lambda: _ready(n.url),
                      lambda: f"the node's workers are ready\n{n.log_tail()}", 240)
        yield n


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0, timeout=300)


def _metric(node: NodeProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as r:  # noqa: S310
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        answer = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, seed=seed, max_tokens=150,
            response_format={"type": "json_schema", "json_schema": {
                "name": "shape", "schema": SHAPE, "strict": True}})
        choice = answer.choices[0]
        assert choice.finish_reason == "stop"
        assert choice.message.content is not None
        jsonschema.validate(json.loads(choice.message.content), SHAPE)


def test_json_schema_streamed_is_the_same_answer(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL, "messages": MESSAGES, "seed": 5, "max_tokens": 150,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "shape", "schema": SHAPE}}}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    text = "".join(chunk.choices[0].delta.content or ""
                   for chunk in client.chat.completions.create(stream=True, **kwargs)
                   if chunk.choices)
    assert text == whole
    jsonschema.validate(json.loads(text), SHAPE)


def test_tool_choice_required_yields_a_valid_call(client: openai.OpenAI) -> None:
    for seed in (1, 2):
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=TOOLS, tool_choice="required", seed=seed)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls
        assert calls is not None and len(calls) == 1
        call = calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_named_tool_is_called_and_streams_as_a_delta(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.message.tool_calls is not None
    call = whole.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    deltas = []
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            deltas.extend(c.delta.tool_calls or [])
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas if d.function] \
        == [(0, "get_weather", call.function.arguments)]
    assert deltas[0].id is not None and deltas[0].id.startswith("call_")


def test_chat_logprobs_are_consistent_and_stream_the_same(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "temperature": 0,
                              "max_tokens": 8, "logprobs": True, "top_logprobs": 4}
    answer = client.chat.completions.create(**kwargs)
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    entries = logprobs.content
    assert len(entries) == answer.usage.completion_tokens  # type: ignore[union-attr]
    for entry in entries:
        assert math.exp(entry.logprob) <= 1.0
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and len(values) == 4
        assert entry.top_logprobs[0].token == entry.token  # greedy: the top-1
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes is not None and bytes(entry.bytes).decode("utf-8", "replace")
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in entries]


def test_completion_logprobs_echo_and_max_tokens_zero(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                       logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    generated = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                          temperature=0, logprobs=3)
    glp = generated.choices[0].logprobs
    assert glp is not None and glp.top_logprobs is not None and glp.token_logprobs is not None
    assert len(glp.token_logprobs) == 5
    for token, value, top in zip(glp.tokens or [], glp.token_logprobs, glp.top_logprobs,
                                 strict=True):
        assert top is not None and len(top) <= 4  # up to logprobs + the sampled one
        assert top[token] == value == max(top.values())  # greedy
    streamed_tokens: list[str] = []
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                           temperature=0, logprobs=3, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.tokens:
                streamed_tokens.extend(c.logprobs.tokens)
    assert streamed_tokens == glp.tokens


@pytest.mark.parametrize(
    ("endpoint", "extra", "param", "at_the_door"),
    [
        ("chat", {"logprobs": True, "top_logprobs": 50}, "top_logprobs", True),
        ("completion", {"logprobs": 6}, "logprobs", True),
        ("chat", {"tools": TOOLS, "tool_choice": {"type": "function",
                                                  "function": {"name": "nope"}}},
         "tool_choice", False),
        ("chat", {"response_format": {"type": "xml"}}, "response_format.type", False),
    ],
)
def test_bad_values_are_refused_before_the_worker(
        node: NodeProcess, client: openai.OpenAI, endpoint: str, extra: dict[str, Any],
        param: str, at_the_door: bool) -> None:
    attempts = _metric(node, "meshnode_upstream_attempts_total", provider="local")
    tokens = _metric(node, "meshnode_tokens_total", provider="local")
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                           **extra)
        else:
            client.completions.create(model=MODEL, prompt="x", max_tokens=3, **extra)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param  # type: ignore[index]
    assert _metric(node, "meshnode_tokens_total", provider="local") == tokens
    if at_the_door:  # refused before routing: the local provider was not even tried
        assert _metric(node, "meshnode_upstream_attempts_total", provider="local") == attempts


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {
                "a": {"$ref": "#/$defs/missing"}}}}}},
         "response_format.json_schema.schema"),
        ({"tools": [TOOLS[0], {"type": "function", "function": {
            "name": "broken", "parameters": {"type": "frobnicate"}}}],
          "tool_choice": "required"}, "tools[1].function.parameters"),
    ],
)
def test_a_schema_that_cannot_compile_is_a_400_and_generates_nothing(
        node: NodeProcess, client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    before = _metric(node, "meshnode_tokens_total", provider="local", direction="output")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, **extra)
    assert info.value.body["param"] == param  # type: ignore[index]
    assert "schema" in info.value.body["message"]  # type: ignore[index]
    assert _metric(node, "meshnode_tokens_total", provider="local",
                   direction="output") == before
    # The worker is still serving.
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"
