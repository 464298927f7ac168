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


@pytest.fixture(scope="session")
def smollm2(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """(model, tokenizer, dir) of the built-in smollm2 (SmolLM2-135M-Instruct), an instruct
    model that follows prompts. Its dequantised weights are kept in pytest's cache, the same
    directory tests/integration/test_local_smollm2.py uses, so a checkout dequantises once."""
    import torch

    from meshnode.worker.builtins import builtin_dir
    from meshnode.worker.models import load_causal_lm

    cache = getattr(request.config, "cache", None)
    models = (Path(cache.mkdir("meshnode-models")) if cache is not None
              else tmp_path_factory.mktemp("meshnode-models"))
    data_dir = tmp_path_factory.mktemp("smollm2-data")
    (data_dir / "models").symlink_to(models, target_is_directory=True)
    path = builtin_dir("smollm2", data_dir)
    model, tokenizer = load_causal_lm(path, torch.device("cpu"))
    return model, tokenizer, path
