"""Shared, session-wide model fixtures for the worker tests (built once: the machine is small)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """(model, tokenizer, data_dir) of the built-in tiny-gpt2, on the CPU."""
    import torch

    from meshnode.worker.builtins import tiny_gpt2_dir
    from meshnode.worker.models import load_causal_lm

    data_dir = tmp_path_factory.mktemp("worker-data")
    model, tokenizer = load_causal_lm(tiny_gpt2_dir(data_dir), torch.device("cpu"))
    return model, tokenizer, data_dir
