"""Choosing each row's next token from its logits, for the whole batch in one pass.

Pure tensor code on the batch's last-position logits: no engine state, no host sync (every
per-row setting arrives as a host list the engine already has). Per row: temperature (0 =
greedy), top_p, and a seed.

Sampling inverts each row's cumulative distribution at one uniform number u: the token whose
interval of the CDF holds u * total, which draws exactly from the distribution (a token the
nucleus cut has an empty interval and is never drawn). The u of a row with a seed is a
counter-based hash of (seed, the row's token number), so a seeded answer is a function of its
seed alone: it does not depend on what else is in the batch, on the row's slot, or on how
many steps the engine ran before it (each row's CDF is computed along its own vocabulary, the
same in any batch). Rows without a seed draw u from torch's generator. Either way it is one
batched pass for all rows, not one launch per seeded row.

Logprobs (only for the rows that ask; the others pay nothing) are taken from the distribution
the token was actually drawn from: the logits, masked by the row's grammar if it has one,
divided by the temperature, cut to the top_p nucleus, then log-softmaxed. A greedy row
(temperature 0) reports the distribution at temperature 1 without the nucleus cut (its point
mass would say nothing), so its token is always its own top-1. Tokens the mask or the nucleus
removed have probability 0 and are left out of `top_logprobs` (OpenAI: "may be fewer than
requested"). Prompt logprobs (completions `echo`) are the model's distribution at temperature 1:
prompt tokens were not sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position: the token, its logprob (None: the prompt's first token, which has no
    context), and the most likely tokens there, best first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_STEP = _signed(0xD1B54A32D192ED03)


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (int64 multiplication wraps, as the algorithm wants)."""
    x = (x ^ _shift(x, 30)) * _MIX1
    x = (x ^ _shift(x, 27)) * _MIX2
    return x ^ _shift(x, 31)


def seeded_uniforms(seeds: Sequence[int], counters: Sequence[int],
                    device: torch.device) -> torch.Tensor:
    """[rows] float64 uniforms in (0, 1), a pure function of (seed, counter)."""
    seed = torch.tensor([_signed(s) for s in seeds], dtype=torch.long, device=device)
    counter = torch.tensor(list(counters), dtype=torch.long, device=device)
    bits = _mix(_mix(seed * _GOLDEN + 1) + counter * _STEP)
    return (_shift(bits, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def nucleus(scaled: torch.Tensor, top_ps: Sequence[float]) -> torch.Tensor:
    """`scaled` with the tokens outside each row's top_p nucleus set to -inf."""
    top_p = torch.tensor(list(top_ps), device=scaled.device)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens before it already cover top_p (the first one stays).
    remove = (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)


def sample(logits: torch.Tensor, temps: Sequence[float], top_ps: Sequence[float],
           seeds: Sequence[int | None], counters: Sequence[int]) -> torch.Tensor:
    """The next token of every row ([rows] long, on the logits' device). `counters[i]` is how
    many tokens row i has drawn before (what makes a seeded draw repeatable)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if all(t == 0.0 for t in temps):
        return greedy
    temp = torch.tensor([t if t > 0 else 1.0 for t in temps], device=logits.device)
    scaled = logits / temp[:, None]
    if any(p < 1.0 for p in top_ps):
        scaled = nucleus(scaled, top_ps)
    cdf = scaled.softmax(dim=-1).to(torch.float64).cumsum(dim=-1)
    uniform = torch.rand(len(temps), dtype=torch.float64, device=logits.device)
    seeded = [i for i, s in enumerate(seeds) if s is not None]
    if seeded:
        drawn = seeded_uniforms([seeds[i] for i in seeded],  # type: ignore[misc]
                                [counters[i] for i in seeded], logits.device)
        uniform[torch.tensor(seeded, device=logits.device)] = drawn
    target = (uniform * cdf[:, -1])[:, None]
    chosen = torch.searchsorted(cdf, target).squeeze(1).clamp(max=cdf.shape[1] - 1)
    if any(t == 0.0 for t in temps):
        is_greedy = torch.tensor([t == 0.0 for t in temps], device=logits.device)
        chosen = torch.where(is_greedy, greedy, chosen)
    return chosen


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[int],
                   temps: Sequence[float], top_ps: Sequence[float],
                   tops: Sequence[int]) -> list[TokenLogprob]:
    """Logprobs of the sampled `tokens` for the batch rows `rows` (with those rows' settings
    and top counts), in one pass and one copy to the host."""
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index)
    greedy = [t == 0.0 for t in temps]
    temp = torch.tensor([1.0 if g else t for g, t in zip(greedy, temps, strict=True)],
                        device=logits.device)
    scaled = sub / temp[:, None]
    cut = [1.0 if g else p for g, p in zip(greedy, top_ps, strict=True)]
    if any(p < 1.0 for p in cut):
        scaled = nucleus(scaled, cut)
    logp = scaled.log_softmax(dim=-1)
    chosen_ids = tokens.index_select(0, index)
    chosen = logp.gather(1, chosen_ids[:, None]).squeeze(1)
    k = min(max(tops), logp.shape[-1])
    if k > 0:
        top_values, top_ids = logp.topk(k, dim=-1)
        host = torch.cat([chosen[:, None], top_values], dim=1).tolist()
        host_ids = torch.cat([chosen_ids[:, None], top_ids], dim=1).tolist()
    else:
        host = chosen[:, None].tolist()
        host_ids = chosen_ids[:, None].tolist()
    out = []
    for values, ids, want in zip(host, host_ids, tops, strict=True):
        top = tuple((int(i), float(v)) for i, v in zip(ids[1:want + 1], values[1:want + 1],
                                                       strict=True) if not math.isinf(v))
        out.append(TokenLogprob(int(ids[0]), float(values[0]), top))
    return out


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], top: int) -> list[TokenLogprob]:
    """Logprobs of a prompt's tokens given the logits at each prompt position ([len, vocab],
    position j predicting token j + 1); the first token has none (OpenAI: null)."""
    ids = torch.tensor(list(prompt[1:]), dtype=torch.long, device=logits.device)
    logp = logits[: len(prompt) - 1].float().log_softmax(dim=-1)
    chosen = logp.gather(1, ids[:, None]).squeeze(1).tolist()
    tops: list[list[float]] = [[] for _ in chosen]
    top_ids: list[list[int]] = [[] for _ in chosen]
    if top > 0 and len(chosen):
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)
        tops, top_ids = values.tolist(), indices.tolist()
    out = [TokenLogprob(int(prompt[0]), None)]
    for token, value, t_values, t_ids in zip(prompt[1:], chosen, tops, top_ids, strict=True):
        out.append(TokenLogprob(int(token), float(value),
                                tuple(zip(t_ids, t_values, strict=True))))
    return out
