"""Model specs (torch-free, shared with the node) and model loading (worker side).

A `ModelSpec` names one configured local model: its public name, kind, and where its weights
are (`path` or `builtin`). A `path` is a Hugging Face directory, or a GGUF file (or a directory
holding exactly one), which `meshnode.worker.gguf` dequantises once into data_dir. The node
checks specs when the provider is built (a missing path is a ConfigError before anything
starts); the worker loads them with transformers: causal LMs for chat/completion, encoders for
embeddings. float32 on the CPU, bfloat16 on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from meshnode.worker.params import ToolSpec
from meshnode.worker.tools import openai_tools, with_tools_prompt

ModelKind = Literal["chat", "completion", "embedding"]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    kind: ModelKind
    path: str | None = None
    builtin: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "path": self.path, "builtin": self.builtin}

    @classmethod
    def from_wire(cls, frame: dict[str, Any]) -> ModelSpec:
        return cls(frame["name"], frame["kind"], frame.get("path"), frame.get("builtin"))


def check_spec(spec: ModelSpec) -> str | None:
    """A problem with the spec that can be seen without loading anything, or None."""
    from meshnode.worker.builtins import BUILTINS, EMBEDDING_BUILTINS, missing_package
    from meshnode.worker.gguf import GGUFError, find_gguf

    if spec.builtin is not None:
        if spec.builtin not in BUILTINS:
            return f"unknown built-in model {spec.builtin!r} (one of {', '.join(BUILTINS)})"
        embedding = spec.builtin in EMBEDDING_BUILTINS
        if (spec.kind == "embedding") != embedding:
            what = "an embedding" if embedding else "a text"
            return f"built-in {spec.builtin!r} is {what} model, not kind {spec.kind!r}"
        return missing_package(spec.builtin)
    if spec.path is None:
        return "a local model needs `path` or `builtin`"
    path = Path(spec.path)
    if not path.exists():
        return f"no such model directory or .gguf file: {path}"
    try:
        gguf = find_gguf(path)
    except GGUFError as exc:
        return str(exc)
    if gguf is not None:
        if spec.kind == "embedding":
            return f"{gguf} is a GGUF file: local GGUF models serve chat or completion"
        return None
    if path.is_file():
        return f"{path} is neither a model directory nor a .gguf file"
    if not (path / "config.json").is_file():
        return (f"{path} is not a Hugging Face model directory (no config.json) and holds no "
                ".gguf file")
    return None


def model_dir(spec: ModelSpec, data_dir: Path) -> Path:
    """The Hugging Face directory to load `spec` from (a GGUF's dequantised cache, built now
    when it is not there yet)."""
    from meshnode.worker.builtins import builtin_dir
    from meshnode.worker.gguf import dequantised_dir, find_gguf

    if spec.builtin is not None:
        return builtin_dir(spec.builtin, data_dir)
    assert spec.path is not None
    path = Path(spec.path)
    gguf = find_gguf(path)
    if gguf is not None:
        return dequantised_dir(spec.name, gguf, data_dir)
    return path


def dtype_for(device: Any) -> Any:
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_causal_lm(path: Path, device: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype_for(device), local_files_only=True
    )
    return model.to(device).eval(), tokenizer


def load_encoder(path: Path, device: Any) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, dtype=dtype_for(device), local_files_only=True)
    return model.to(device).eval(), tokenizer


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template has tool support of its own (it reads `tools`)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]] | None,
                  prompt: str | None, tools: list[ToolSpec] | None = None) -> list[int]:
    """Prompt token ids: chat messages through the tokenizer's chat template when it has one
    (a plain `role: content` transcript otherwise), or a completion prompt as is. `tools` go
    through the template's own tool support when it has one, else into a system message in
    the format of `meshnode.worker.tools`."""
    if messages is not None:
        native_tools = bool(tools) and template_renders_tools(tokenizer)
        if tools and not native_tools:
            messages = with_tools_prompt(messages, tools)
        if getattr(tokenizer, "chat_template", None):
            extra: dict[str, Any] = {"tools": openai_tools(tools)} if tools and native_tools \
                else {}
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **extra
            )
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        # The template already wrote any special tokens it wants.
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
        return ids
    assert prompt is not None
    ids = tokenizer.encode(prompt)
    return ids
