"""The engine's measured speeds (meshnode.worker.rates): pure, from steps' sizes and seconds."""

from __future__ import annotations

import pytest

from meshnode.worker.rates import MIN_PREFILL_SHARE, StepRates


def test_nothing_measured_reads_zero() -> None:
    rates = StepRates()
    assert (rates.prefill_tokens_per_s, rates.decode_tokens_per_s) == (0.0, 0.0)
    rates.record(0, False, 0.5)  # a step that neither prefilled nor decoded
    rates.record(100, True, 0.0)  # no time: nothing to learn
    assert (rates.prefill_tokens_per_s, rates.decode_tokens_per_s) == (0.0, 0.0)


def test_a_decode_step_is_one_token_a_stream_and_a_prefill_step_its_prompt() -> None:
    rates = StepRates()
    rates.record(0, True, 0.05)  # a decode step: 20 tokens/s a stream
    assert rates.decode_tokens_per_s == pytest.approx(20.0)
    rates.record(400, False, 1.0)  # a pure prefill step: 400 prompt tokens in 1 s
    assert rates.prefill_tokens_per_s == pytest.approx(400.0)
    # Exponentially weighted: a faster decode step moves it a tenth of the way.
    rates.record(0, True, 0.025)
    assert rates.decode_step_s == pytest.approx(0.9 * 0.05 + 0.1 * 0.025)


def test_a_step_that_prefilled_and_decoded_charges_prefill_less_a_decode_step() -> None:
    rates = StepRates()
    rates.record(0, True, 0.1)
    rates.record(200, True, 1.1)  # 1.0 s of prefill for 200 positions, 0.1 s of decode
    assert rates.prefill_tokens_per_s == pytest.approx(200.0)
    assert rates.decode_step_s == pytest.approx(0.1)  # a mixed step is no decode sample
    # A decode estimate longer than the step cannot make prefill look instantaneous.
    fresh = StepRates(decode_step_s=2.0)
    fresh.record(100, True, 1.0)
    assert fresh.prefill_tokens_per_s == pytest.approx(100 / (MIN_PREFILL_SHARE * 1.0))
