"""Grammar masks on their own: the bitmask applied to exactly the rows that have a matcher, and
a tokenizer llguidance cannot read turning into a clear refusal, not a dead worker."""

from __future__ import annotations

import pytest
import torch

from meshnode.worker.builtins import build_byte_tokenizer
from meshnode.worker.grammar import GrammarError, Grammars
from meshnode.worker.params import Constraint, ToolSpec


def test_masks_touch_only_the_rows_that_have_a_matcher() -> None:
    tokenizer = build_byte_tokenizer(300)
    grammars = Grammars(tokenizer, 300, frozenset())
    schema = {"type": "object", "properties": {"a": {"enum": ["x"]}}, "required": ["a"],
              "additionalProperties": False}
    matcher = grammars.compile(Constraint("json_schema", schema=schema))
    logits = torch.randn(3, 300)
    before = logits.clone()
    grammars.apply_masks(logits, [1], [matcher])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = (logits[1] > float("-inf")).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)
    assert torch.equal(logits[1][allowed], before[1][allowed])
    for token in tokenizer.encode('{"a": "x"}'):
        assert matcher.consume_token(token)
    assert matcher.is_stopped()


class _SlowTokenizer:
    """Not a fast (Rust) tokenizer: llguidance cannot read it."""

    eos_token_id = 0

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


@pytest.mark.parametrize(("constraint", "param"), [
    (Constraint("json_object"), "response_format"),
    (Constraint("tool_call", tools=(ToolSpec(0, "f"),)), "tool_choice"),
])
def test_a_tokenizer_llguidance_cannot_read_is_a_refusal(constraint: Constraint,
                                                          param: str) -> None:
    grammars = Grammars(_SlowTokenizer(), 26, frozenset())
    assert not grammars.available
    with pytest.raises(GrammarError) as info:
        grammars.compile(constraint)
    assert info.value.param == param
    assert "not available" in info.value.message
    assert grammars.token_bytes(2) == b"C"  # logprobs still name their tokens
