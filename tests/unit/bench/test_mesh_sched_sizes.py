"""bench.mesh_sched sizes its engines' prefix pools from the run (no nodes started here)."""

from __future__ import annotations

from dataclasses import replace

from bench.mesh_sched import FULL, QUICK, distinct_prompt_tokens, pool_tokens


def test_the_pool_is_a_third_of_the_runs_distinct_prompt_tokens_unless_given() -> None:
    run = replace(FULL, conversations=12, turns=4, max_tokens=8, spread_s=5.0)
    # 2 groups' 1,024-token system prompts, 12 conversations of 4 user turns and 3 answers.
    assert distinct_prompt_tokens(run) == 2 * 1024 + 12 * (4 * 160 + 3 * 8)
    assert pool_tokens(run) == -(-distinct_prompt_tokens(run) // 3) == 3339
    # The full run holds more, so its pool is larger; a given size stands.
    assert pool_tokens(FULL) == -(-(4 * 1024 + 24 * (5 * 160 + 4 * 16)) // 3)
    assert pool_tokens(replace(QUICK, prefix_pool_tokens=999)) == 999
