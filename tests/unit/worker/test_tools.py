"""The tool-call text format: parsing a model's text into content and calls, whole or split at
any point, and the prompt that shows tools to a template without tool support."""

from __future__ import annotations

import json

import pytest

from meshnode.worker.params import ToolSpec
from meshnode.worker.tools import ToolCallStream, render_call, with_tools_prompt

NAMES = frozenset({"get_weather", "get_time"})


def _parse(text: str, pieces: int = 1) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    """Feed `text` in `pieces` roughly equal deltas; (content, [(name, arguments)])."""
    parser = ToolCallStream(NAMES)
    step = max(1, len(text) // pieces)
    content = ""
    calls = []
    for i in range(0, len(text), step):
        delta, made = parser.push(text[i:i + step])
        content += delta
        calls += made
    rest, made = parser.finish()
    content += rest
    calls += made
    assert parser.calls == calls
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>',
     "Let me check.\n", [("get_time", {"zone": 1})]),
    ('<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
     "\n", [("get_time", {"zone": 1}), ("get_weather", {"city": "Oslo"})]),
    ('  {"name": "get_weather", "parameters": {"city": "Rome"}}', "",
     [("get_weather", {"city": "Rome"})]),
    ('[{"name": "get_time", "arguments": {}}]', "", [("get_time", {})]),
    ('{"name": "not_offered", "arguments": {}}', '{"name": "not_offered", "arguments": {}}', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("The capital is Paris. <tool", "The capital is Paris. <tool", []),
    ("<tool_call>not json</tool_call> then text", "<tool_call>not json</tool_call> then text",
     []),
    ('<tool_call>{"name": "get_time", "arguments": {"zone": 2}}', "",
     [("get_time", {"zone": 2})]),  # the model stopped before the closing tag
    ("plain text, no calls at all", "plain text, no calls at all", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_text_splits_into_content_and_calls(text: str, content: str,
                                            calls: list[tuple[str, dict[str, object]]],
                                            pieces: int) -> None:
    got_content, got_calls = _parse(text, pieces)
    assert got_calls == calls
    if calls:
        assert got_content.strip() == content.strip()
    else:
        assert got_content == content


def test_content_streams_before_a_call_ends() -> None:
    parser = ToolCallStream(NAMES)
    shown, _ = parser.push("Sure, checking")
    assert shown == "Sure, checking"
    shown, made = parser.push(' now <tool_call>{"name": "get_time", ')
    assert shown == " now " and made == []
    shown, made = parser.push('"arguments": {}}</tool_call>')
    assert shown == "" and [c.name for c in made] == ["get_time"]
    assert made[0].id.startswith("call_") and len(made[0].id) > 10


def test_a_rendered_call_parses_back() -> None:
    text = render_call("get_weather", '{"city": "Lima"}')
    assert _parse(text)[1] == [("get_weather", {"city": "Lima"})]


def test_tools_go_into_the_system_message() -> None:
    tools = [ToolSpec(0, "get_time", "Time now", {"type": "object"})]
    merged = with_tools_prompt([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}], tools)
    assert [m["role"] for m in merged] == ["system", "user"]
    assert merged[0]["content"].startswith("Be brief.")
    assert '"name": "get_time"' in merged[0]["content"] and "<tool_call>" in merged[0]["content"]
    added = with_tools_prompt([{"role": "user", "content": "hi"}], tools)
    assert [m["role"] for m in added] == ["system", "user"]


TOOL_TEMPLATE = (
    "{% if tools %}[TOOLS]{% for t in tools %}{{ t['function']['name'] }};{% endfor %}"
    "[/TOOLS]{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
)


def test_a_template_with_tool_support_renders_the_tools_itself() -> None:
    from meshnode.worker.builtins import build_byte_tokenizer
    from meshnode.worker.models import encode_prompt, template_renders_tools

    tokenizer = build_byte_tokenizer(300)
    tools = [ToolSpec(0, "get_time", None, None)]
    messages = [{"role": "user", "content": "hi"}]
    assert not template_renders_tools(tokenizer)
    fallback = tokenizer.decode(encode_prompt(tokenizer, messages, None, tools))
    assert "<tool_call>" in fallback and '"name": "get_time"' in fallback
    tokenizer.chat_template = TOOL_TEMPLATE
    assert template_renders_tools(tokenizer)
    native = tokenizer.decode(encode_prompt(tokenizer, messages, None, tools))
    assert native == "[TOOLS]get_time;[/TOOLS]<user>hi<assistant>"
    plain = tokenizer.decode(encode_prompt(tokenizer, messages, None, None))
    assert plain == "<user>hi<assistant>"
