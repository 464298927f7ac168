"""The router's budget hook: price a call's worst case, reserve it, settle or release it.

The router calls `SpendGate.reserve(request, offer)` right before it tries a candidate, and on
the returned `Hold` exactly one of: `settle(usage, chunks)` (the call answered, or a stream
ended for any reason: the client pays what was incurred), `release()` (the attempt failed
before any answer), or `abandon()` (the client left during a non-stream call: its worst case is
charged, since the upstream may finish and bill it). `reserve` raises `BudgetExceeded` when the
candidate cannot be afforded; the router then moves on to the next candidate, so when the
budget is spent only free offers (both prices 0) still serve, and a request nobody free can
serve is refused with 429 `budget_exceeded`.

Every method is synchronous and never block on the network (a local SQLite commit).

Worst case of a call (`worst_case_cost`): the prompt estimate at the input price plus, per
choice (`n`, `best_of`), `max_tokens` clamped to what the model's context leaves after the
prompt, at the output price. A request with no `max_tokens` on a model of unknown maximum
cannot be priced: it reserves the ceiling `budget.max_reservation`.

Across a hop (docs/security.md): the entry node reserves a peer's offer at the peer's dearest
price for the model (`ModelOffer.worst_*`) and settles with the cost the peer reports
(`settle(..., cost=)`). The serving node reserves a forwarded request (`request.visited`) in its
own ledger too, against its own limits and for the asserted key, as a *served* reservation (it
charges the `served:` slots, which mesh totals do not sum: the entry node's charge counts once),
and refuses any offer whose worst case exceeds what the entry node reserved
(`request.caller.reserved_usd`), so a peer never spends more than the caller holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from meshnode.errors import BudgetExceeded
from meshnode.governance.budget import EPSILON, BudgetLedger, Reservation, SpendLimits
from meshnode.providers.tokens import estimate_prompt_tokens
from meshnode.types import BudgetHeld, InferenceRequest, ModelOffer, RequestKind, Usage


class Hold(Protocol):
    def settle(self, usage: Usage | None, chunks: int = 0, cost: float | None = None) -> float:
        """Charge what the call incurred (`cost` when a peer reported it, else priced from
        `usage`); returns the cost charged (USD)."""
        ...

    def held(self) -> BudgetHeld | None:
        """What this hold reserves, for the assertion sent with a forwarded attempt (None: no
        budget applies, the peer is not capped)."""
        ...

    def release(self) -> None:
        """The attempt failed before any answer: it costs nothing."""
        ...

    def abandon(self) -> None:
        """The client left during a non-stream call: the upstream may still finish it and
        bill it, so it pays its worst case."""
        ...


class SpendGate(Protocol):
    def reserve(self, request: InferenceRequest, offer: ModelOffer) -> Hold:
        """Hold the worst case of serving `request` with `offer`; raises BudgetExceeded."""
        ...


class FreeHold:
    """The hold of a free call: nothing to settle."""

    __slots__ = ()

    def settle(self, usage: Usage | None, chunks: int = 0, cost: float | None = None) -> float:
        return 0.0

    def held(self) -> BudgetHeld | None:
        return BudgetHeld(0, 0.0)  # a budget applies and this call may cost nothing

    def release(self) -> None:
        return None

    def abandon(self) -> None:
        return None


FREE = FreeHold()


class UncappedHold(FreeHold):
    """The hold of a node without budgets: nothing to settle, and no cap for a peer."""

    __slots__ = ()

    def held(self) -> BudgetHeld | None:
        return None


UNCAPPED = UncappedHold()


def is_free(offer: ModelOffer) -> bool:
    """Free at its dearest: a peer whose cheapest provider is free may still fail over to a
    paid one."""
    return offer.worst_input <= 0.0 and offer.worst_output <= 0.0


def _choices(request: InferenceRequest) -> int:
    n = 1
    for name in ("n", "best_of"):
        value = request.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > n:
            n = value
    return n


def _prompts(request: InferenceRequest) -> int:
    """Prompts of a legacy completion (a list of strings or of token-id lists is several; each
    gets its own `n` choices), 1 for anything else."""
    if request.kind is not RequestKind.COMPLETION:
        return 1
    prompt = request.body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    return 1


def prompt_tokens(request: InferenceRequest) -> int:
    """The larger of the front end's estimate and `providers.tokens`' (which also counts chat
    framing): under-estimating the prompt is the one way a priced call overspends."""
    return max(request.prompt_tokens_estimate, estimate_prompt_tokens(request.kind, request.body))


def worst_case_cost(request: InferenceRequest, offer: ModelOffer, ceiling: float) -> float:
    """The most the call can cost; `ceiling` when that cannot be bounded."""
    prompt = prompt_tokens(request)
    prompt_cost = prompt * offer.worst_input / 1000.0
    output_price = offer.worst_output
    if request.kind is RequestKind.EMBEDDING or output_price <= 0.0:
        return prompt_cost
    out = request.max_output_tokens
    prompts = _prompts(request)
    if offer.max_context_tokens is not None:
        # With several prompts the estimate is their sum: one short prompt may leave nearly
        # the whole context, so only the context itself bounds each.
        room = max(0, offer.max_context_tokens - (prompt if prompts == 1 else 0))
        out = room if out is None else min(out, room)
    if out is None:
        return max(ceiling, prompt_cost)
    return prompt_cost + prompts * _choices(request) * out * output_price / 1000.0


def incurred_cost(request: InferenceRequest, offer: ModelOffer, usage: Usage | None,
                  chunks: int) -> float:
    """The real cost when usage is known; else (a stream cut short) the prompt estimate plus
    one output token per chunk relayed (streams carry about one token per chunk)."""
    if usage is not None and usage.total_tokens > 0:
        return offer.cost(usage)
    return (
        prompt_tokens(request) * offer.cost_per_1k_input
        + max(0, chunks) * offer.cost_per_1k_output
    ) / 1000.0


class LedgerHold:
    __slots__ = ("_ledger", "_reservation", "_request", "_offer")

    def __init__(self, ledger: BudgetLedger, reservation: Reservation,
                 request: InferenceRequest, offer: ModelOffer) -> None:
        self._ledger = ledger
        self._reservation = reservation
        self._request = request
        self._offer = offer

    @property
    def amount(self) -> float:
        return self._reservation.amount

    def settle(self, usage: Usage | None, chunks: int = 0, cost: float | None = None) -> float:
        if cost is None or not cost >= 0:
            cost = incurred_cost(self._request, self._offer, usage, chunks)
        self._ledger.settle(self._reservation, cost)
        return cost

    def held(self) -> BudgetHeld | None:
        return BudgetHeld(self._reservation.id, self._reservation.amount)

    def release(self) -> None:
        self._ledger.release(self._reservation)

    def abandon(self) -> None:
        self._ledger.settle(self._reservation, self._reservation.amount)


def check_caller_cap(request: InferenceRequest, offer: ModelOffer, ceiling: float) -> None:
    """A forwarded request may not cost more than its entry node reserved for it."""
    caller = request.caller
    if not request.visited or caller is None or caller.reserved_usd is None:
        return
    worst = 0.0 if is_free(offer) else worst_case_cost(request, offer, ceiling)
    if worst > caller.reserved_usd + EPSILON:
        raise BudgetExceeded(
            f"{offer.provider} could cost up to ${worst:.6f} for this call, but the entry "
            f"node {caller.entry_node} reserved only ${caller.reserved_usd:.6f}",
            retry_after=1.0,
        )


class CapOnlyGate:
    """`SpendGate` of a node with budgets off: nothing is reserved, but a forwarded request is
    still held to what its entry node reserved."""

    def __init__(self, ceiling: float) -> None:
        self._ceiling = ceiling

    def reserve(self, request: InferenceRequest, offer: ModelOffer) -> Hold:
        check_caller_cap(request, offer, self._ceiling)
        return UNCAPPED


class BudgetGate:
    """`SpendGate` over a `BudgetLedger`; per-key limits come from `key_limits(name)`."""

    def __init__(
        self,
        ledger: BudgetLedger,
        key_limits: Callable[[str], SpendLimits | None],
        max_reservation: float,
    ) -> None:
        self._ledger = ledger
        self._key_limits = key_limits
        self._ceiling = max_reservation

    def reserve(self, request: InferenceRequest, offer: ModelOffer) -> Hold:
        check_caller_cap(request, offer, self._ceiling)
        forwarded = bool(request.visited)
        caller = request.caller
        if is_free(offer):
            return FREE
        key = caller.key_name if forwarded and caller is not None else (
            None if forwarded else request.key_name)
        limits = self._key_limits(key) if key is not None else None
        amount = worst_case_cost(request, offer, self._ceiling)
        reservation = self._ledger.reserve(amount, key, limits, served=forwarded)
        return LedgerHold(self._ledger, reservation, request, offer)
