"""Grammar masks for constrained decoding (llguidance), in the worker.

Owns: turning a `Constraint` (`params.py`) into an llguidance grammar, compiling it against the
model's tokenizer when the request is admitted (a schema llguidance cannot compile is a
`RequestRejected` naming the field, before anything runs), and, per step, one token bitmask for
the rows that carry a matcher, applied to those rows' logits only. Rows without a grammar cost
nothing: the engine calls `apply_masks` only when some row has a matcher.

Formats forced:
- `json_object`: one JSON object; `json_schema`: JSON valid against the schema (llguidance's
  JSON compiler: `strict: true` refuses keywords it does not implement, otherwise they are
  ignored, as `lenient`);
- `tool_call`: exactly one call of one offered function, in `tools.py`'s format, its arguments
  valid against that function's `parameters` (each schema compiled on its own, so its `$ref`s
  resolve against itself, and an error names `tools[i].function.parameters`).
JSON is written compactly, `", "` and `": "` as separators, no other whitespace, so a model
(random weights included) cannot pad the answer with blanks forever.

Must not touch the engine's batch state; must not import anything from the node side.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from meshnode.worker.params import Constraint, ToolSpec
from meshnode.worker.tools import CALL_CLOSE, CALL_OPEN

_JSON_OPTIONS: Any = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
}


class GrammarError(Exception):
    """A constraint that cannot be compiled; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Grammars:
    """One per engine: the model's llguidance tokenizer (built on first use, ~1 s for a large
    vocabulary) and the compilation of constraints into matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = eos_ids
        self._ll: Any = None
        self._ll_error: str | None = None
        self._executor: Any = None
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self._bytes: dict[int, bytes] = {}

    @property
    def available(self) -> bool:
        """Whether llguidance can read this model's tokenizer (it needs a fast one)."""
        if self._ll is None and self._ll_error is None:
            import llguidance.hf

            eos: list[int] | None = sorted(self._eos_ids) or None
            try:
                self._ll = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self.vocab_size, eos_token=eos)
            except (ValueError, TypeError, RuntimeError) as exc:
                self._ll_error = str(exc) or type(exc).__name__
        return self._ll is not None

    @property
    def lltokenizer(self) -> Any:
        if not self.available:
            raise GrammarError(f"constrained decoding is not available for this model's "
                               f"tokenizer ({self._ll_error})", "response_format")
        return self._ll

    def stop_ids(self) -> frozenset[int]:
        """Tokens that end a constrained row (the grammar's end-of-sequence)."""
        return frozenset(self.lltokenizer.eos_tokens)

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes (llguidance knows them for byte-level and SentencePiece
        vocabularies alike; without it, the token's decoded text)."""
        found = self._bytes.get(token)
        if found is None:
            if self.available:
                found = bytes(self._ll.decode_bytes([token]))
            else:
                found = str(self._tokenizer.decode([token])).encode("utf-8")
            self._bytes[token] = found
        return found

    # ------------------------------------------------------------------ compile
    def compile(self, constraint: Constraint) -> Any:
        """A fresh matcher for `constraint` (copy it per row with `deep_copy()`)."""
        import llguidance

        if not self.available:
            param = "tool_choice" if constraint.kind == "tool_call" else "response_format"
            raise GrammarError(f"constrained decoding is not available for this model's "
                               f"tokenizer ({self._ll_error})", param)
        if constraint.kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, overrides=_JSON_OPTIONS)
            return self._matcher(grammar, "response_format")
        if constraint.kind == "json_schema":
            param = "response_format.json_schema.schema"
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    constraint.schema or {"type": "object"},
                    defaults={"lenient": not constraint.strict}, overrides=_JSON_OPTIONS)
            except (ValueError, TypeError) as exc:
                raise GrammarError(f"the JSON schema cannot be used: {exc}", param) from None
            return self._matcher(grammar, param)
        return self._matcher(self._tool_grammar(constraint.tools), "tools")

    def _matcher(self, grammar: str, param: str) -> Any:
        import llguidance

        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the schema cannot be compiled for constrained decoding: "
                               f"{matcher.get_error()}", param)
        return matcher

    def _tool_grammar(self, tools: tuple[ToolSpec, ...]) -> str:
        import llguidance

        rules = []
        alternatives = []
        for k, tool in enumerate(tools):
            param = f"tools[{tool.index}].function.parameters"
            schema = dict(tool.parameters or {"type": "object"})
            # Each schema alone first: its own error, its own field name.
            try:
                alone = llguidance.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"lenient": True}, overrides=_JSON_OPTIONS)
            except (ValueError, TypeError) as exc:
                raise GrammarError(f"the parameters schema cannot be used: {exc}",
                                   param) from None
            problem = llguidance.LLMatcher.validate_grammar(alone, self.lltokenizer)
            if problem and not problem.startswith("WARNING"):
                raise GrammarError(f"the parameters schema cannot be compiled for "
                                   f"constrained decoding: {problem}", param)
            guidance = {"lenient": True, **_JSON_OPTIONS, **schema.get("x-guidance", {})}
            schema["x-guidance"] = guidance
            head = json.dumps(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
            rules.append(f"call_{k}: {head} args_{k} \"}}\"")
            rules.append(f"args_{k}: %json {json.dumps(schema)}")
            alternatives.append(f"call_{k}")
        start = (f"start: {json.dumps(CALL_OPEN + chr(10))} ({' | '.join(alternatives)}) "
                 f"{json.dumps(chr(10) + CALL_CLOSE)}")
        return str(llguidance.LLMatcher.grammar_from_lark("\n".join([start, *rules])))

    # ------------------------------------------------------------------ per step
    def apply_masks(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> None:
        """Mask, in place, the logits of `rows` (indices into the batch) to what each row's
        matcher allows next. One bitmask for them all, filled in parallel by llguidance."""
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=min(4, os.cpu_count() or 1))
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
        # What llguidance.torch.fill_next_token_bitmask_par does, without importing that
        # module (it sets up a torch.compile kernel the worker does not use).
        self._executor.unsafe_compute_mask_ptr(
            [(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(), words * 4, len(rows))
        device = logits.device
        shifts = self._shifts.get(device)
        if shifts is None:
            shifts = torch.arange(32, dtype=torch.int32, device=device)
            self._shifts[device] = shifts
        bits = (bitmask.to(device).unsqueeze(-1) >> shifts) & 1
        allowed = bits.reshape(len(rows), words * 32)[:, : logits.shape[-1]].bool()
        index = torch.tensor(rows, dtype=torch.long, device=device)
        sub = logits.index_select(0, index)
        sub.masked_fill_(~allowed, float("-inf"))
        logits.index_copy_(0, index, sub)
