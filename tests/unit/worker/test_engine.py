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
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1, stop=("\x00never", stop))
    stopped, usage = _run(model, tokenizer, [(1, prompt, params)])
    assert stopped[(1, 0)] == (text[: text.index(stop)], "stop")
    assert usage[1][1] < 16
    # The last event names the string that fired; an answer that ran out of tokens names none.
    for asked, fired in ((params, stop), (SamplingParams(max_tokens=4, temperature=0.0), None)):
        engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 4)
        engine.submit(1, prompt, asked)
        events = [e for _ in iter(engine.has_work, False) for e in engine.step().events]
        assert events[-1].finish is not None and events[-1].stop_sequence == fired
        assert all(e.stop_sequence is None for e in events[:-1])


# --------------------------------------------------------------------------- fixed slots
def _drain(engine: GenerationEngine) -> tuple[Answers, dict[int, tuple[int, int]]]:
    answers: Answers = {}
    usage: dict[int, tuple[int, int]] = {}
    while engine.has_work():
        result = engine.step()
        for event in result.events:
            text, _ = answers.get((event.request_id, event.choice), ("", None))
            answers[(event.request_id, event.choice)] = (text + event.text, event.finish)
        for done in result.done:
            usage[done.request_id] = (done.prompt_tokens, done.completion_tokens)
    return answers, usage


def test_a_join_writes_only_the_newcomers_slot(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 4)
    prompts = _prompts(tokenizer)
    engine.submit(1, prompts[0], SamplingParams(max_tokens=40, temperature=0.0))
    engine.submit(2, prompts[1], SamplingParams(max_tokens=2, temperature=0.0))
    for _ in range(3):
        engine.step()  # request 2 has left: slot 1 is free again
    assert engine.active_rows == 1
    tensors = (engine.cache.keys[0], engine.cache.values[-1])
    pointers = [t.data_ptr() for t in tensors]
    length = engine._requests[1].rows[0].length  # what slot 0 holds now
    assert length == len(prompts[0]) + 3
    before = [t[0, :, :length].clone() for t in tensors]
    engine.submit(3, prompts[2], SamplingParams(max_tokens=5, temperature=0.0))
    engine.step()  # 3 joins into slot 1 (reused); 1 decodes one more position
    assert [t.data_ptr() for t in tensors] == pointers  # no reallocation, no concatenation
    for t, old in zip(tensors, before, strict=True):
        assert torch.equal(t[0, :, :length], old)  # the running row's cache is untouched
    assert engine._requests[3].rows[0].slot == 1


def _long_prompt(tokenizer: Any, words: int) -> list[int]:
    text = " ".join(f"word{i % 37}" for i in range(words))
    return encode_prompt(tokenizer, [{"role": "user", "content": text}], None)


def test_a_prefix_hit_answers_as_a_cold_run_with_a_smaller_prefill(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    shared = _long_prompt(tokenizer, 60)
    first = shared + tokenizer.encode(" first question")
    second = shared + tokenizer.encode(" and another one")
    greedy = SamplingParams(max_tokens=8, temperature=0.0)

    cold = GenerationEngine(model, tokenizer, torch.device("cpu"), 4)
    cold.submit(2, second, greedy)
    cold_answers, _ = _drain(cold)

    warm = GenerationEngine(model, tokenizer, torch.device("cpu"), 4)
    warm.submit(1, first, greedy)
    _drain(warm)
    before = warm.prefilled_tokens
    warm.submit(2, second, greedy)
    done: list[Any] = []
    answers: Answers = {}
    while warm.has_work():
        result = warm.step()
        done += result.done
        for event in result.events:
            text, _ = answers.get((event.request_id, event.choice), ("", None))
            answers[(event.request_id, event.choice)] = (text + event.text, event.finish)
    assert answers == cold_answers
    cached = done[0].cached_tokens
    assert cached >= len(shared) - 16 and cached % 16 == 0
    assert warm.prefilled_tokens - before == len(second) - cached
    assert cold.prefilled_tokens == len(second)
    assert warm.prefix_summary()  # the held chain is reported


def test_chunked_prefill_keeps_running_rows_decoding(tiny_gpt2: Any) -> None:
    from meshnode.worker.engine import EngineOptions

    model, tokenizer, _ = tiny_gpt2
    options = EngineOptions(prefill_chunk=16, prefix_cache_mb=0)
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 4, options)
    running = SamplingParams(max_tokens=40, temperature=0.0)
    short = _prompts(tokenizer)[0]
    engine.submit(1, short, running)
    answers: Answers = {}

    def step() -> Any:
        result = engine.step()
        for event in result.events:
            text, _ = answers.get((event.request_id, event.choice), ("", None))
            answers[(event.request_id, event.choice)] = (text + event.text, event.finish)
        return result

    while not engine._requests[1].rows:
        step()
    long = _long_prompt(tokenizer, 60)
    engine.submit(2, long, SamplingParams(max_tokens=4, temperature=0.0))
    steps = 0
    before = engine.prefilled_tokens
    while not engine._requests[2].rows:
        result = step()
        steps += 1
        assert engine.prefilled_tokens - before <= 16 * steps  # one chunk a step at most
        assert result.tokens >= 1  # request 1 made its next token in this very step
    assert steps == -(-len(long) // 16)
    while engine.has_work():
        step()
    alone, _ = _run(model, tokenizer, [(1, short, running)])
    assert answers[(1, 0)] == alone[(1, 0)]  # decoding beside a chunked prefill: same answer
    assert answers[(2, 0)][1] == "length"


def test_an_injected_oom_fails_only_that_steps_rows(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 4)
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    expected, _ = _run(model, tokenizer, [(1, prompts[0], params)])
    engine.submit(1, prompts[0], params)
    engine.step()  # 1 is running
    engine.submit(2, prompts[1], params)
    engine.inject_oom = 1
    result = engine.step()
    assert [f.request_id for f in result.failed] == [2]
    assert not result.events
    engine.submit(3, prompts[2], params)  # the next request is served
    answers, usage = _drain(engine)
    assert set(usage) == {1, 3}
    assert expected[(1, 0)][0].endswith(answers[(1, 0)][0])  # 1 went on as if alone
    assert engine.active_rows == 0 and engine.scheduler.free_slots == 4


def test_admission_refuses_what_cannot_fit_a_slot(tiny_gpt2: Any) -> None:
    from meshnode.worker.engine import EngineOptions

    model, tokenizer, _ = tiny_gpt2
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 2, EngineOptions(max_len=64))
    assert engine.context == 64
    with pytest.raises(RequestRejected) as info:
        engine.submit(1, [5] * 40, SamplingParams(max_tokens=30))
    assert info.value.param == "max_tokens"
    with pytest.raises(RequestRejected) as info:
        engine.submit(2, [5] * 10, SamplingParams(max_tokens=4, n=3))
    assert info.value.param == "n"
    engine.submit(3, [5] * 40, SamplingParams(max_tokens=24, temperature=0.0))
    engine.submit(4, [5] * 10, SamplingParams(max_tokens=2, n=2))  # waits for two slots
    _, usage = _drain(engine)
    assert usage == {3: (40, 24), 4: (10, 4)}


def test_prompts_arriving_together_compute_their_shared_prefix_once(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    shared = _long_prompt(tokenizer, 30)
    prompts = [shared + tokenizer.encode(f" question {i}") for i in range(4)]
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 4)
    for i, prompt in enumerate(prompts):
        engine.submit(i, prompt, greedy)
    done: dict[int, int] = {}
    answers: Answers = {}
    while engine.has_work():
        result = engine.step()
        done.update({d.request_id: d.cached_tokens for d in result.done})
        for event in result.events:
            text, _ = answers.get((event.request_id, event.choice), ("", None))
            answers[(event.request_id, event.choice)] = (text + event.text, event.finish)
    assert done[0] == 0 and all(done[i] >= len(shared) - 16 for i in (1, 2, 3))
    assert engine.prefilled_tokens == sum(len(p) for p in prompts) - sum(done.values())
    for i, prompt in enumerate(prompts):  # and each answers as it would alone
        alone, _ = _run(model, tokenizer, [(i, prompt, greedy)])
        assert alone[(i, 0)] == answers[(i, 0)]


def test_max_tokens_zero_finishes_at_once_with_length(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    prompts = _prompts(tokenizer)
    requests = [(1, prompts[0], SamplingParams(max_tokens=0, n=2)),
                (2, prompts[1], SamplingParams(max_tokens=2, temperature=0.0))]
    answers, usage = _run(model, tokenizer, requests)
    assert answers[(1, 0)] == ("", "length") and answers[(1, 1)] == ("", "length")
    assert usage[1] == (len(prompts[0]), 0)
    assert usage[2] == (len(prompts[1]), 2)


def test_the_engine_measures_its_prefill_and_decode_speed(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 2)
    assert (engine.rates.prefill_tokens_per_s, engine.rates.decode_tokens_per_s) == (0.0, 0.0)
    prompt = _prompts(tokenizer)[1]
    engine.submit(1, prompt, SamplingParams(max_tokens=4, temperature=0.0))
    engine.step()  # the prefill (and its first token): no decode step measured yet
    assert engine.rates.prefill_tokens_per_s > 0 and engine.rates.decode_step_s == 0.0
    while engine.has_work():
        engine.step()
    assert engine.rates.decode_tokens_per_s > 0
