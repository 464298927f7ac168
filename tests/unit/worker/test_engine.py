"""The continuous-batching engine, in-process on the tiny model: joining and leaving the batch
must not change any answer, limits are exact, seeds are per request."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from meshnode.worker.engine import GenerationEngine, RequestRejected
from meshnode.worker.models import encode_prompt
from meshnode.worker.params import SamplingParams

pytestmark = pytest.mark.slow

Answers = dict[tuple[int, int], tuple[str, str | None]]


def _run(model: Any, tokenizer: Any, requests: list[tuple[int, list[int], SamplingParams]],
         join_every: int = 0, max_batch: int = 16) -> tuple[Answers, dict[int, tuple[int, int]]]:
    """Run requests; with join_every > 0 a new one is submitted every that many steps."""
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), max_batch)
    pending = list(requests)
    if join_every:
        engine.submit(*pending.pop(0))
    else:
        for request in pending:
            engine.submit(*request)
        pending = []
    answers: Answers = {}
    usage: dict[int, tuple[int, int]] = {}
    steps = 0
    while engine.has_work() or pending:
        if pending and steps % join_every == join_every - 1:
            engine.submit(*pending.pop(0))
        result = engine.step()
        steps += 1
        for event in result.events:
            text, _ = answers.get((event.request_id, event.choice), ("", None))
            answers[(event.request_id, event.choice)] = (text + event.text, event.finish)
        for done in result.done:
            usage[done.request_id] = (done.prompt_tokens, done.completion_tokens)
    return answers, usage


def _prompts(tokenizer: Any) -> list[list[int]]:
    texts = ["hello there", "a much longer prompt than the first one, by far", "x",
             "the end is near", "fifth"]
    return [encode_prompt(tokenizer, [{"role": "user", "content": t}], None) for t in texts]


def test_joining_and_leaving_does_not_change_greedy_answers(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    requests = [(i, p, SamplingParams(max_tokens=4 + 2 * i, temperature=0.0))
                for i, p in enumerate(_prompts(tokenizer))]
    together, usage = _run(model, tokenizer, requests, join_every=2)
    for request in requests:
        alone, alone_usage = _run(model, tokenizer, [request])
        assert alone[(request[0], 0)] == together[(request[0], 0)]
        assert alone_usage[request[0]] == usage[request[0]]
    for i, prompt in enumerate(_prompts(tokenizer)):
        assert usage[i] == (len(prompt), 4 + 2 * i)  # max_tokens exact, usage exact
        assert together[(i, 0)][1] == "length"


def test_seeded_sampling_is_independent_of_the_batch(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    requests = [(i, p, SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8, seed=11, n=2))
                for i, p in enumerate(_prompts(tokenizer))]
    together, usage = _run(model, tokenizer, requests, join_every=1, max_batch=4)
    for request in requests[:2]:
        alone, _ = _run(model, tokenizer, [request])
        for choice in range(2):
            assert alone[(request[0], choice)] == together[(request[0], choice)]
    assert all(completion == 12 for _, completion in usage.values())  # n=2 x 6 tokens


def test_more_requests_than_slots_all_finish(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    requests = [(i, p, SamplingParams(max_tokens=3)) for i, p in
                enumerate(_prompts(tokenizer) * 3)]
    _, usage = _run(model, tokenizer, requests, max_batch=2)
    assert sorted(usage) == list(range(15))


def test_cancel_removes_a_request(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 4)
    prompts = _prompts(tokenizer)
    engine.submit(1, prompts[0], SamplingParams(max_tokens=50, temperature=0.0))
    engine.submit(2, prompts[1], SamplingParams(max_tokens=3, temperature=0.0))
    engine.step()
    engine.cancel(1)
    done = []
    while engine.has_work():
        result = engine.step()
        assert all(e.request_id == 2 for e in result.events)
        done.extend(result.done)
    assert [d.request_id for d in done] == [2]
    assert engine.active_rows == 0


def test_context_limits_are_rejected(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 4)
    with pytest.raises(RequestRejected) as info:
        engine.submit(1, [5] * 10, SamplingParams(max_tokens=engine.context))
    assert info.value.param == "max_tokens"
    with pytest.raises(RequestRejected):
        engine.submit(2, [5] * engine.context, SamplingParams(max_tokens=1))


def test_stop_string_ends_with_finish_stop(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    prompt = _prompts(tokenizer)[0]
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1)
    free, _ = _run(model, tokenizer, [(1, prompt, params)])
    text = free[(1, 0)][0]
    # A printable character of the free answer past its start (the model's text is noise).
    stop = next(c for c in text[2:] if c.isascii() and c.isprintable() and not c.isspace())
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1, stop=(stop,))
    stopped, usage = _run(model, tokenizer, [(1, prompt, params)])
    assert stopped[(1, 0)] == (text[: text.index(stop)], "stop")
    assert usage[1][1] < 16


def test_max_tokens_zero_finishes_at_once_with_length(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    prompts = _prompts(tokenizer)
    requests = [(1, prompts[0], SamplingParams(max_tokens=0, n=2)),
                (2, prompts[1], SamplingParams(max_tokens=2, temperature=0.0))]
    answers, usage = _run(model, tokenizer, requests)
    assert answers[(1, 0)] == ("", "length") and answers[(1, 1)] == ("", "length")
    assert usage[1] == (len(prompts[0]), 0)
    assert usage[2] == (len(prompts[1]), 2)
