"""Batched sampling: greedy rows exact, seeded rows a function of (seed, token number) only."""

from __future__ import annotations

import torch

from meshnode.worker.sampler import sample, seeded_uniforms


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    alone = sample(logits[2:3], [0.8], [0.9], [7], [3])
    together = sample(logits, [1.0, 0.0, 0.8, 1.3], [1.0, 1.0, 0.9, 0.5], [None, None, 7, 9],
                      [0, 0, 3, 1])
    assert together[2] == alone[0]
    assert together[1] == logits[1].argmax()  # the greedy row
    other = sample(logits[2:3], [0.8], [0.9], [7], [4])  # the next token number draws anew
    draws = {int(sample(logits[2:3], [0.8], [0.9], [7], [c])[0]) for c in range(40)}
    assert len(draws) > 1 and int(other[0]) in draws


def test_seeded_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()[None].repeat(3000, 1)
    tokens = sample(logits, [1.0] * 3000, [1.0] * 3000, list(range(3000)), [0] * 3000)
    freq = torch.bincount(tokens, minlength=3).float() / 3000
    assert torch.allclose(freq, probs, atol=0.04)


def test_top_p_never_draws_outside_the_nucleus() -> None:
    logits = torch.tensor([[4.0, 3.0, -2.0, -3.0]]).repeat(200, 1)
    tokens = sample(logits, [1.0] * 200, [0.5] * 200, list(range(200)), [0] * 200)
    assert set(tokens.tolist()) == {0}


def test_uniforms_are_in_the_open_interval_and_repeatable() -> None:
    seeds, counters = list(range(-500, 500)), [i % 7 for i in range(1000)]
    u = seeded_uniforms(seeds, counters, torch.device("cpu"))
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert torch.equal(u, seeded_uniforms(seeds, counters, torch.device("cpu")))
    assert abs(float(u.mean()) - 0.5) < 0.05 and len(set(u.tolist())) == 1000
