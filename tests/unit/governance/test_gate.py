import dataclasses
from pathlib import Path

import pytest

from meshnode.config import BudgetConfig
from meshnode.errors import BudgetExceeded
from meshnode.governance.budget import BudgetLedger, SpendLimits
from meshnode.governance.gate import FREE, BudgetGate, worst_case_cost
from meshnode.types import BudgetHeld, Caller, InferenceRequest, ModelOffer, RequestKind, Usage

PAID = ModelOffer(model="gpt", provider="openai", provider_kind="openai", upstream_model="gpt",
                  cost_per_1k_input=1.0, cost_per_1k_output=2.0)
FREE_OFFER = ModelOffer(model="gpt", provider="local", provider_kind="local",
                        upstream_model="gpt")


def req(prompt: int = 100, max_out: int | None = 50, kind: RequestKind = RequestKind.CHAT,
        key: str | None = None, visited: tuple[str, ...] = (), **body: object) -> InferenceRequest:
    return InferenceRequest(kind=kind, model="gpt", body=dict(body), request_id="r",
                            deadline=0.0, key_name=key, visited=visited,
                            prompt_tokens_estimate=prompt, max_output_tokens=max_out)


def test_worst_case_is_prompt_plus_max_tokens_times_price() -> None:
    assert worst_case_cost(req(100, 50), PAID, 9.0) == pytest.approx(0.1 + 0.1)
    assert worst_case_cost(req(100, 50, n=3), PAID, 9.0) == pytest.approx(0.1 + 0.3)
    assert worst_case_cost(req(100, None, kind=RequestKind.EMBEDDING), PAID, 9.0) == \
        pytest.approx(0.1)


def test_each_prompt_of_a_completion_list_gets_its_n_choices() -> None:
    def completion(prompt: object, max_out: int = 50, **body: object) -> InferenceRequest:
        return InferenceRequest(kind=RequestKind.COMPLETION, model="gpt",
                                body={"prompt": prompt, **body}, request_id="r", deadline=0.0,
                                prompt_tokens_estimate=100, max_output_tokens=max_out)

    assert worst_case_cost(completion(["a", "b", "c"], n=2), PAID, 9.0) == \
        pytest.approx(0.1 + 3 * 2 * 0.1)
    assert worst_case_cost(completion([[1, 2], [3]]), PAID, 9.0) == pytest.approx(0.1 + 2 * 0.1)
    assert worst_case_cost(completion([1, 2, 3]), PAID, 9.0) == pytest.approx(0.1 + 0.1)
    assert worst_case_cost(completion("x", 0), PAID, 9.0) == pytest.approx(0.1)


def test_max_tokens_is_clamped_to_the_model_context() -> None:
    small = ModelOffer(model="gpt", provider="o", provider_kind="openai", upstream_model="g",
                       cost_per_1k_input=1.0, cost_per_1k_output=2.0, max_context_tokens=150)
    assert worst_case_cost(req(100, 10_000), small, 9.0) == pytest.approx(0.1 + 0.1)
    assert worst_case_cost(req(100, None), small, 9.0) == pytest.approx(0.1 + 0.1)


def test_unpriceable_request_reserves_the_ceiling() -> None:
    assert worst_case_cost(req(100, None), PAID, 0.75) == 0.75


def gate(tmp_path: Path, limit: float, key_limits: SpendLimits | None = None) -> BudgetGate:
    led = BudgetLedger(BudgetConfig(daily_limit=limit), tmp_path / "s.db", "a")
    led.open()
    return BudgetGate(led, lambda name: key_limits, max_reservation=1.0)


def test_free_offers_pass_a_spent_budget_forwarded_requests_do_not(tmp_path: Path) -> None:
    """Issue 15: a forwarded request was free on the serving node, whatever it cost there."""
    g = gate(tmp_path, 0.0)
    assert g.reserve(req(), FREE_OFFER) is FREE
    with pytest.raises(BudgetExceeded):
        g.reserve(req(visited=("x",)), PAID)
    with pytest.raises(BudgetExceeded):
        g.reserve(req(), PAID)


def forwarded(reserved: float | None, key: str | None = "ci") -> InferenceRequest:
    return dataclasses.replace(
        req(100, 50, key="forged", visited=("entry", "a")),
        caller=Caller(key_name=key, models=None, entry_node="entry", reservation_id=7,
                      reserved_usd=reserved),
    )


def test_a_peer_that_can_fail_over_to_paid_is_not_free_and_reserves_its_dearest(
    tmp_path: Path,
) -> None:
    peer = dataclasses.replace(FREE_OFFER, provider="mesh", node="b",
                               worst_cost_per_1k_input=1.0, worst_cost_per_1k_output=2.0)
    g = gate(tmp_path, 10.0)
    hold = g.reserve(req(100, 50), peer)
    assert hold is not FREE and hold.held() == BudgetHeld(1, pytest.approx(0.2))
    assert hold.settle(Usage(10, 5), cost=0.0123) == 0.0123  # the peer's report wins
    assert g._ledger.spent() == pytest.approx(0.0123)


def test_a_forwarded_request_is_capped_by_the_entry_reservation_and_charged_as_served(
    tmp_path: Path,
) -> None:
    g = gate(tmp_path, 10.0)
    with pytest.raises(BudgetExceeded) as err:
        g.reserve(forwarded(0.1), PAID)  # worst case 0.2 > 0.1 held by the entry node
    assert "entry node entry reserved only $0.100000" in err.value.message
    with pytest.raises(BudgetExceeded):
        g.reserve(forwarded(0.0), PAID)  # the entry node thought it free
    assert g.reserve(forwarded(0.0), FREE_OFFER) is FREE
    hold = g.reserve(forwarded(0.25), PAID)
    assert hold.settle(Usage(10, 5)) == pytest.approx(0.02)
    ledger = g._ledger
    # Charged to the served twins, under the asserted key (never the body's key_name).
    assert ledger.spent() == pytest.approx(0.02)  # its own providers' spend counts
    assert ledger.counters.own("served:*", ledger.status()[0].period) == pytest.approx(0.02)
    assert ledger.counters.own("*", ledger.status()[0].period) == 0.0
    assert ledger.spent("served:key:ci") == pytest.approx(0.02)
    assert ledger.spent("served:key:forged") == 0.0
    assert ledger.summary()["served_today_this_node"] == pytest.approx(0.02)
    # Uncapped: the entry node has no budget.
    assert g.reserve(forwarded(None), PAID).held() is not None


def test_mesh_totals_do_not_double_count_served_spend(tmp_path: Path) -> None:
    entry = BudgetLedger(BudgetConfig(daily_limit=1.0, scope="mesh"), tmp_path / "e.db", "e")
    served = BudgetLedger(BudgetConfig(daily_limit=1.0, scope="mesh"), tmp_path / "s.db", "s")
    entry.open()
    served.open()
    entry.settle(entry.reserve(0.3, "ci"), 0.3)
    served.settle(served.reserve(0.3, "ci", served=True), 0.3)
    entry.merge_counters(served.export_counters())
    served.merge_counters(entry.export_counters())
    assert entry.spent() == served.spent() == pytest.approx(0.3)
    # A caller that charged nothing (no budget, or no gossip): its own spend still counts.
    lonely = BudgetLedger(BudgetConfig(daily_limit=1.0, scope="mesh"), tmp_path / "l.db", "l")
    lonely.open()
    lonely.settle(lonely.reserve(0.4, served=True), 0.4)
    assert lonely.spent() == pytest.approx(0.4)
    with pytest.raises(BudgetExceeded):
        lonely.reserve(0.7, served=True)


def test_settle_charges_real_usage_or_what_a_cut_stream_incurred(tmp_path: Path) -> None:
    g = gate(tmp_path, 10.0)
    h = g.reserve(req(100, 50), PAID)
    assert h.settle(Usage(prompt_tokens=10, completion_tokens=5)) == pytest.approx(0.02)
    h2 = g.reserve(req(100, 50), PAID)
    assert h2.settle(None, chunks=20) == pytest.approx(0.1 + 0.04)
    h3 = g.reserve(req(100, 50), PAID)
    h3.release()
    assert g._ledger.spent() == pytest.approx(0.16)


def test_reservation_uses_the_key_limits(tmp_path: Path) -> None:
    g = gate(tmp_path, 10.0, SpendLimits(daily=0.3))
    g.reserve(req(100, 50, key="ci"), PAID)
    with pytest.raises(BudgetExceeded):
        g.reserve(req(100, 50, key="ci"), PAID)
