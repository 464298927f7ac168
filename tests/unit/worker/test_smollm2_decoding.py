"""Constrained decoding and logprobs on a model that follows instructions (SmolLM2-135M-Instruct,
greedy): the constrained answers are not only valid but right."""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
import pytest
import torch

from meshnode.worker.engine import GenerationEngine, TextEvent
from meshnode.worker.models import encode_prompt
from meshnode.worker.params import Constraint, SamplingParams, ToolSpec
from meshnode.worker.tools import ToolCallStream

pytestmark = pytest.mark.slow

CAPITAL = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 40},
                                            "capital": {"type": "string", "maxLength": 40}},
           "required": ["country", "capital"], "additionalProperties": False}
WEATHER = ToolSpec(0, "get_weather", "Get the current weather in a city", {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
    "required": ["city"], "additionalProperties": False})


def test_constrained_answers_are_valid_and_right(smollm2: Any) -> None:
    model, tokenizer, _ = smollm2
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 8)
    france = [{"role": "user", "content": "What is the capital of France?"}]
    weather = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    greedy = {"max_tokens": 40, "temperature": 0.0}
    engine.submit(1, encode_prompt(tokenizer, france, None), SamplingParams(
        **greedy, constraint=Constraint("json_schema", schema=CAPITAL, strict=True)))
    engine.submit(2, encode_prompt(tokenizer, weather, None, [WEATHER]), SamplingParams(
        **greedy, constraint=Constraint("tool_call", tools=(WEATHER,))))
    engine.submit(3, encode_prompt(tokenizer, france, None), SamplingParams(
        **greedy, logprobs=5))
    events: dict[int, list[TextEvent]] = {}
    while engine.has_work():
        for event in engine.step().events:
            events.setdefault(event.request_id, []).append(event)
    texts = {k: "".join(e.text for e in v) for k, v in events.items()}
    assert all(v[-1].finish == "stop" for v in events.values()), texts

    answer = json.loads(texts[1])
    jsonschema.validate(answer, CAPITAL)
    assert "Paris" in answer["capital"]

    parser = ToolCallStream(frozenset({"get_weather"}))
    _, calls = parser.push(texts[2])
    calls += parser.finish()[1]
    assert [c.name for c in calls] == ["get_weather"]
    arguments = json.loads(calls[0].arguments)
    jsonschema.validate(arguments, WEATHER.parameters)
    assert "Paris" in arguments["city"]

    assert "Paris" in texts[3]
    entries = [e for event in events[3] for e in (event.logprobs or ())]
    assert entries
    for entry in entries:
        assert entry.logprob is not None and math.exp(entry.logprob) <= 1.0
        assert entry.top[0][0] == entry.token  # greedy: its own top-1
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
