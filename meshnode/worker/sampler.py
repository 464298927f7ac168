"""Choosing each row's next token from its logits, and the logprobs of what was chosen.

Pure tensor code on the batch's last-position logits (after any grammar mask): no engine
state. Per row: temperature (0 = greedy), top_p, and an own `torch.Generator` when the request
gave a seed, so a seeded answer does not depend on what else is in the batch.

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


def _nucleus(scaled: torch.Tensor, top_ps: Sequence[float]) -> torch.Tensor:
    """`scaled` with the tokens outside each row's top_p nucleus set to -inf."""
    top_p = torch.tensor(top_ps, device=scaled.device)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens before it already cover top_p (the first one stays).
    remove = (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)


def sample(logits: torch.Tensor, temps: Sequence[float], top_ps: Sequence[float],
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """The next token of every row ([rows] long, on the logits' device)."""
    if all(t == 0.0 for t in temps):
        return logits.argmax(dim=-1)
    temp = torch.tensor([t if t > 0 else 1.0 for t in temps], device=logits.device)
    scaled = logits / temp[:, None]
    if any(p < 1.0 for p in top_ps):
        scaled = _nucleus(scaled, top_ps)
    probs = scaled.softmax(dim=-1)
    out = torch.empty(len(temps), dtype=torch.long, device=logits.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        index = torch.tensor(shared, device=logits.device)
        out[index] = torch.multinomial(probs.index_select(0, index), 1).squeeze(1)
    for i, generator in enumerate(generators):
        if generator is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    greedy = [i for i, t in enumerate(temps) if t == 0.0]
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        out[index] = logits.index_select(0, index).argmax(dim=-1)
    return out


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
        scaled = _nucleus(scaled, cut)
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
