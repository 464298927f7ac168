"""Logprobs from the engine, on tiny-gpt2: consistent with themselves and with a plain forward
pass of the model, free for the rows that do not ask, and the same alone or in a batch."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from meshnode.worker.engine import GenerationEngine, TextEvent
from meshnode.worker.models import encode_prompt
from meshnode.worker.params import Constraint, SamplingParams
from meshnode.worker.sampler import TokenLogprob

pytestmark = pytest.mark.slow


def _engine(tiny_gpt2: Any) -> GenerationEngine:
    model, tokenizer, _ = tiny_gpt2
    return GenerationEngine(model, tokenizer, torch.device("cpu"), 16)


def _prompt(engine: GenerationEngine, text: str) -> list[int]:
    return encode_prompt(engine.tokenizer, [{"role": "user", "content": text}], None)


def _events(engine: GenerationEngine) -> dict[tuple[int, int], list[TextEvent]]:
    out: dict[tuple[int, int], list[TextEvent]] = {}
    while engine.has_work():
        for event in engine.step().events:
            out.setdefault((event.request_id, event.choice), []).append(event)
    return out


def _entries(events: list[TextEvent]) -> list[TokenLogprob]:
    return [e for event in events for e in (event.logprobs or ())]


def _check(entry: TokenLogprob, k: int) -> None:
    assert entry.logprob is not None
    assert math.exp(entry.logprob) <= 1.0 + 1e-6
    values = [v for _, v in entry.top]
    assert len(values) <= k
    assert values == sorted(values, reverse=True)
    assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5
    for token, value in entry.top:
        if token == entry.token:
            assert value == pytest.approx(entry.logprob, abs=1e-6)


def test_greedy_tokens_are_top_one_and_match_a_plain_forward_pass(tiny_gpt2: Any) -> None:
    model, _, _ = tiny_gpt2
    engine = _engine(tiny_gpt2)
    prompt = _prompt(engine, "hello there")
    engine.submit(1, prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=5))
    entries = _entries(_events(engine)[(1, 0)])
    assert len(entries) == 8  # one per generated token (no end token: tiny-gpt2 has none)
    ids = list(prompt)
    for entry in entries:
        _check(entry, 5)
        assert len(entry.top) == 5
        assert entry.top[0][0] == entry.token
        assert entry.top[0][1] == pytest.approx(entry.logprob)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        expected = logits.log_softmax(-1)
        assert entry.token == int(logits.argmax())
        assert entry.logprob == pytest.approx(float(expected[entry.token]), abs=1e-4)
        ids.append(entry.token)


def test_sampled_logprobs_are_of_the_sampled_distribution(tiny_gpt2: Any) -> None:
    engine = _engine(tiny_gpt2)
    engine.submit(1, _prompt(engine, "x"), SamplingParams(
        max_tokens=12, temperature=0.7, top_p=0.6, seed=3, logprobs=20))
    entries = _entries(_events(engine)[(1, 0)])
    assert len(entries) == 12
    for entry in entries:
        _check(entry, 20)
        # The nucleus cut: what is left sums to 1, and the sampled token is inside it.
        assert entry.token in {t for t, _ in entry.top} or len(entry.top) == 20
        if len(entry.top) < 20:
            assert sum(math.exp(v) for _, v in entry.top) == pytest.approx(1.0, abs=1e-4)


def test_logprobs_under_a_grammar_leave_out_what_the_grammar_forbids(tiny_gpt2: Any) -> None:
    engine = _engine(tiny_gpt2)
    schema = {"type": "object", "properties": {"a": {"enum": ["yes", "no"]}},
              "required": ["a"], "additionalProperties": False}
    engine.submit(1, _prompt(engine, "x"), SamplingParams(
        max_tokens=40, temperature=1.0, seed=4, logprobs=3,
        constraint=Constraint("json_schema", schema=schema)))
    events = _events(engine)[(1, 0)]
    entries = _entries(events)
    assert entries
    text = "".join(e.text for e in events)
    assert text in ('{"a": "yes"}', '{"a": "no"}')
    first = entries[0]
    _check(first, 3)
    assert first.logprob == pytest.approx(0.0, abs=1e-6)  # '{' is the only choice
    assert [t for t, _ in first.top] == [first.token]


def test_asking_for_logprobs_does_not_change_the_answer(tiny_gpt2: Any) -> None:
    prompt_text = "the same question"
    texts = []
    for logprobs in (None, 4):
        engine = _engine(tiny_gpt2)
        engine.submit(1, _prompt(engine, prompt_text), SamplingParams(
            max_tokens=10, temperature=0.9, seed=7, n=2, logprobs=logprobs))
        events = _events(engine)
        texts.append([("".join(e.text for e in events[(1, c)]), events[(1, c)][-1].finish)
                      for c in range(2)])
        if logprobs is None:
            assert all(e.logprobs is None for evs in events.values() for e in evs)
    assert texts[0] == texts[1]


def test_logprobs_are_the_same_alone_and_in_a_batch(tiny_gpt2: Any) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=2, logprobs=3)
    engine = _engine(tiny_gpt2)
    engine.submit(1, _prompt(engine, "alone"), params)
    alone = _entries(_events(engine)[(1, 0)])
    engine = _engine(tiny_gpt2)
    engine.submit(2, _prompt(engine, "someone else, longer"),
                  SamplingParams(max_tokens=10, temperature=0.0))
    engine.step()  # request 1 is not in it yet: nothing of its is lost
    engine.submit(1, _prompt(engine, "alone"), params)
    together = _entries(_events(engine)[(1, 0)])
    assert [e.token for e in alone] == [e.token for e in together]
    for a, b in zip(alone, together, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_echo_gives_the_prompt_and_its_logprobs(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    engine = _engine(tiny_gpt2)
    text = "Scoring this sentence."
    prompt = encode_prompt(tokenizer, None, text)
    engine.submit(1, prompt, SamplingParams(max_tokens=0, echo=True, logprobs=2))
    engine.submit(2, prompt, SamplingParams(max_tokens=3, echo=True, temperature=0.0))
    events = _events(engine)
    scored = events[(1, 0)]
    assert scored[0].text == text
    assert "".join(e.text for e in scored) == text  # max_tokens 0: nothing generated
    assert scored[-1].finish == "length"
    entries = _entries(scored)
    assert [e.token for e in entries] == prompt
    assert entries[0].logprob is None
    with torch.no_grad():
        logp = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    for j, entry in enumerate(entries[1:], start=1):
        assert entry.logprob == pytest.approx(float(logp[j - 1, prompt[j]]), abs=1e-4)
        assert [t for t, _ in entry.top] == logp[j - 1].topk(2).indices.tolist()
    echoed = events[(2, 0)]
    assert echoed[0].text == text and echoed[0].logprobs is None
    assert len("".join(e.text for e in echoed)) > len(text) or echoed[-1].finish == "length"


def test_max_tokens_zero_uses_no_completion_tokens(tiny_gpt2: Any) -> None:
    engine = _engine(tiny_gpt2)
    prompt = encode_prompt(engine.tokenizer, None, "abc")
    engine.submit(1, prompt, SamplingParams(max_tokens=0, echo=True))
    done = []
    while engine.has_work():
        done.extend(engine.step().done)
    assert [(d.prompt_tokens, d.completion_tokens) for d in done] == [(len(prompt), 0)]
