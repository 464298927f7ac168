from pathlib import Path

import pytest

from meshnode.config import BudgetConfig
from meshnode.errors import BudgetExceeded
from meshnode.governance.budget import BudgetLedger, SpendLimits
from meshnode.governance.gate import FREE, BudgetGate, worst_case_cost
from meshnode.types import InferenceRequest, ModelOffer, RequestKind, Usage

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


def test_free_offers_and_forwarded_requests_pass_a_spent_budget(tmp_path: Path) -> None:
    g = gate(tmp_path, 0.0)
    assert g.reserve(req(), FREE_OFFER) is FREE
    assert g.reserve(req(visited=("x",)), PAID) is FREE
    with pytest.raises(BudgetExceeded):
        g.reserve(req(), PAID)


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
