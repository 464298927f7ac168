"""Constrained decoding in the engine, on the random-weight tiny-gpt2: whatever the weights, a
constrained answer parses and validates; a schema that cannot compile is refused at submit;
rows without a grammar answer exactly as they would alone."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from meshnode.worker.engine import GenerationEngine, RequestRejected
from meshnode.worker.models import encode_prompt
from meshnode.worker.params import Constraint, SamplingParams, ToolSpec
from meshnode.worker.tools import ToolCallStream

pytestmark = pytest.mark.slow

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["circle", "square", "line"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
        "filled": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 8},
        "points": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                   "maxItems": 3},
    },
    "required": ["kind", "size", "filled", "label", "points"],
    "additionalProperties": False,
}

WEATHER = ToolSpec(0, "get_weather", "Weather in a city", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
})
TIME = ToolSpec(1, "get_time", None, {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False,
})


def _engine(tiny_gpt2: Any, max_batch: int = 16) -> GenerationEngine:
    model, tokenizer, _ = tiny_gpt2
    return GenerationEngine(model, tokenizer, torch.device("cpu"), max_batch)


def _prompt(engine: GenerationEngine, text: str = "answer in JSON") -> list[int]:
    return encode_prompt(engine.tokenizer, [{"role": "user", "content": text}], None)


Answers = dict[tuple[int, int], tuple[str, str | None]]


def _step(engine: GenerationEngine, answers: Answers) -> None:
    for event in engine.step().events:
        text, _ = answers.get((event.request_id, event.choice), ("", None))
        answers[(event.request_id, event.choice)] = (text + event.text, event.finish)


def _drain(engine: GenerationEngine, answers: Answers | None = None) -> Answers:
    answers = {} if answers is None else answers
    while engine.has_work():
        _step(engine, answers)
    return answers


def test_json_schema_answers_validate_for_every_seed(tiny_gpt2: Any) -> None:
    engine = _engine(tiny_gpt2)
    constraint = Constraint("json_schema", schema=SCHEMA, strict=True)
    for seed in range(5):
        engine.submit(seed, _prompt(engine), SamplingParams(
            max_tokens=200, temperature=1.0, seed=seed, constraint=constraint, n=2))
    answers = _drain(engine)
    assert len(answers) == 10
    for text, finish in answers.values():
        assert finish == "stop"  # the grammar completed, not the token budget
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_answers_parse(tiny_gpt2: Any) -> None:
    engine = _engine(tiny_gpt2)
    for seed in range(6):
        engine.submit(seed, _prompt(engine), SamplingParams(
            max_tokens=300, temperature=1.0, seed=seed, constraint=Constraint("json_object")))
    answers = _drain(engine)
    finished = [text for text, finish in answers.values() if finish == "stop"]
    # A random model may write a key forever; every answer it did finish is one object.
    assert finished
    for text in finished:
        assert isinstance(json.loads(text), dict)
    for text, _ in answers.values():
        assert text.startswith("{")


def test_required_tool_call_validates(tiny_gpt2: Any) -> None:
    engine = _engine(tiny_gpt2)
    tools = (WEATHER, TIME)
    for seed in range(4):
        engine.submit(seed, _prompt(engine, "weather?"), SamplingParams(
            max_tokens=200, temperature=1.0, seed=seed,
            constraint=Constraint("tool_call", tools=tools)))
    engine.submit(9, _prompt(engine, "time?"), SamplingParams(
        max_tokens=200, temperature=0.0, constraint=Constraint("tool_call", tools=(TIME,))))
    answers = _drain(engine)
    schemas = {t.name: t.parameters for t in tools}
    for (request_id, _), (text, finish) in answers.items():
        assert finish == "stop"
        parser = ToolCallStream(frozenset(schemas))
        content, calls = parser.push(text)
        rest, more = parser.finish()
        assert (content + rest).strip() == ""
        assert len(calls + more) == 1
        call = (calls + more)[0]
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        if request_id == 9:
            assert call.name == "get_time"  # the named function


@pytest.mark.parametrize(
    ("constraint", "param"),
    [
        (Constraint("json_schema", schema={"type": "frobnicate"}),
         "response_format.json_schema.schema"),
        (Constraint("json_schema", schema={"type": "object",
                                           "properties": {"a": {"$ref": "#/$defs/missing"}}}),
         "response_format.json_schema.schema"),
        (Constraint("json_schema", schema={"type": "string", "format": "no-such-format"},
                    strict=True), "response_format.json_schema.schema"),
        (Constraint("tool_call", tools=(WEATHER, ToolSpec(3, "bad", None, {"type": "nope"}))),
         "tools[3].function.parameters"),
    ],
)
def test_a_schema_that_cannot_compile_is_refused_at_submit(
        tiny_gpt2: Any, constraint: Constraint, param: str) -> None:
    engine = _engine(tiny_gpt2)
    with pytest.raises(RequestRejected) as info:
        engine.submit(1, _prompt(engine), SamplingParams(max_tokens=5, constraint=constraint))
    assert info.value.param == param
    assert not engine.has_work()


def test_unknown_keywords_are_ignored_unless_strict(tiny_gpt2: Any) -> None:
    engine = _engine(tiny_gpt2)
    schema = {"type": "object", "properties": {"a": {"type": "string", "format": "odd"}}}
    engine.submit(1, _prompt(engine), SamplingParams(
        max_tokens=5, constraint=Constraint("json_schema", schema=schema, strict=False)))
    assert engine.has_work()


def test_rows_without_a_grammar_answer_as_they_would_alone(tiny_gpt2: Any) -> None:
    plain = [SamplingParams(max_tokens=12, temperature=0.0),
             SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=5)]
    prompts = ["hello there", "a longer prompt than the first"]
    alone: dict[int, tuple[str, str | None]] = {}
    for i, params in enumerate(plain):
        engine = _engine(tiny_gpt2)
        engine.submit(i, _prompt(engine, prompts[i]), params)
        alone[i] = _drain(engine)[(i, 0)]
    engine = _engine(tiny_gpt2)
    together: Answers = {}
    # Constrained and logprob rows join and leave around the plain ones.
    engine.submit(10, _prompt(engine), SamplingParams(
        max_tokens=40, temperature=1.0, seed=1, constraint=Constraint("json_object")))
    _step(engine, together)
    engine.submit(0, _prompt(engine, prompts[0]), plain[0])
    _step(engine, together)
    engine.submit(11, _prompt(engine), SamplingParams(
        max_tokens=3, temperature=0.7, seed=2, logprobs=5,
        constraint=Constraint("json_schema", schema=SCHEMA)))
    engine.submit(1, _prompt(engine, prompts[1]), plain[1])
    _drain(engine, together)
    assert together[(0, 0)] == alone[0]
    assert together[(1, 0)] == alone[1]
