"""`bench.instructions`: a real backend and node, the node under callgrind. It asserts that the
counted requests were counted (each costs the node more than a minimal Python proxy's ~100k
instructions, a stream more than a whole answer), not any particular figure."""

from __future__ import annotations

import shutil

import pytest

from bench.instructions import count
from bench.targets import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="valgrind not installed"),
]


def test_counts_the_nodes_instructions_per_request() -> None:
    whole = count(REPO, stream=False, requests=5, warmup=2, hash_seed="0")
    stream = count(REPO, stream=True, requests=5, warmup=2, hash_seed="0")
    assert 100_000 < whole < 5_000_000
    assert stream > whole
