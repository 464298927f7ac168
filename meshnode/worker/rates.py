"""The engine's measured speeds: prefill tokens/s and decode tokens/s per stream.

What `cache_aware` weighs a prefix hit with (`routing.strategies.prefill_share`): a hit saves
prefill, and prefill's share of a request's service is its prompt over the prompt plus its
output tokens times how many prompt tokens one decoded token costs as long as, which is the
prefill rate over the per-stream decode rate. That ratio is ~10 for a CPU worker and far more on
a GPU, so the worker measures it and the node gossips it with its capacity.

Measured from the engine's own steps, with no extra device sync (a step's wall time ends at its
one host sync): a step with no prefill is a decode step (its time: one token for every decoding
stream); a step that prefilled is charged its time less a decode step's when it decoded too,
over the prompt positions it computed. Both are exponentially weighted. Pure: the engine passes
the step's sizes and seconds; no clock, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# A prefill step's share that is never charged to the decode it shared the step with: one bad
# decode estimate cannot make prefill look instantaneous.
MIN_PREFILL_SHARE = 0.1


@dataclass(slots=True)
class StepRates:
    """Exponentially weighted prefill tokens/s and decode tokens/s per stream (0.0: not
    measured yet). Not thread-safe: the worker's engine thread owns it."""

    prefill_alpha: float = 0.3  # prefill steps are few (one a prompt chunk): weigh each more
    decode_alpha: float = 0.1
    prefill_tokens_per_s: float = 0.0
    decode_step_s: float = 0.0  # one decode step: one token for each decoding stream

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s one stream decodes at (0.0 until a decode step was measured)."""
        return 1.0 / self.decode_step_s if self.decode_step_s > 0 else 0.0

    def record(self, prefill_tokens: int, decoded: bool, seconds: float) -> None:
        """One step: the prompt positions it computed, whether it decoded, its wall time."""
        if seconds <= 0:
            return
        if prefill_tokens <= 0:
            if decoded:
                self.decode_step_s = _ewma(self.decode_step_s, seconds, self.decode_alpha)
            return
        prefill_s = seconds - (self.decode_step_s if decoded else 0.0)
        prefill_s = max(prefill_s, MIN_PREFILL_SHARE * seconds)
        self.prefill_tokens_per_s = _ewma(self.prefill_tokens_per_s, prefill_tokens / prefill_s,
                                          self.prefill_alpha)


def _ewma(old: float, sample: float, alpha: float) -> float:
    return sample if old <= 0 else alpha * sample + (1 - alpha) * old
