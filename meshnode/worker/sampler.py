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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
