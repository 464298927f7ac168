"""Generation parameters: parsed and checked from an OpenAI body, on the node side.

Torch-free on purpose: the node imports this to reject bad sampling values with a 400 before a
request ever reaches a worker. The worker receives the checked values in its `generate` frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from meshnode.errors import InvalidRequest
from meshnode.worker.tools import render_call

MAX_N = 16
MAX_STOP = 4
# OpenAI's bounds: chat `top_logprobs` 0..20, legacy completions `logprobs` 0..5.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

ConstraintKind = Literal["json_object", "json_schema", "tool_call"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function tool of a chat request (`tools[index]`)."""

    index: int
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments; None: any object

    def to_wire(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "description": self.description,
                "parameters": self.parameters}

    @classmethod
    def from_wire(cls, frame: dict[str, Any]) -> ToolSpec:
        return cls(int(frame["index"]), frame["name"], frame.get("description"),
                   frame.get("parameters"))


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the output must be, enforced token by token by the worker's grammar
    (`meshnode.worker.grammar`): any JSON object, JSON matching `schema`, or one call of one of
    `tools` in the tool-call format of `meshnode.worker.tools`."""

    kind: ConstraintKind
    schema: dict[str, Any] | None = None  # json_schema only
    strict: bool = False
    tools: tuple[ToolSpec, ...] = ()  # tool_call only

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "schema": self.schema, "strict": self.strict,
                "tools": [t.to_wire() for t in self.tools]}

    @classmethod
    def from_wire(cls, frame: dict[str, Any]) -> Constraint:
        return cls(frame["kind"], frame.get("schema"), bool(frame.get("strict", False)),
                   tuple(ToolSpec.from_wire(t) for t in frame.get("tools", ())))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None  # None: up to the model's context; 0 (completions): prompt only
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    # None: no logprobs; k: the sampled token's logprob and the k most likely alternatives.
    logprobs: int | None = None
    echo: bool = False  # completions: the prompt comes back first (with its logprobs if asked)
    constraint: Constraint | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
            "n": self.n,
            "logprobs": self.logprobs,
            "echo": self.echo,
            "constraint": self.constraint.to_wire() if self.constraint is not None else None,
        }

    @classmethod
    def from_wire(cls, frame: dict[str, Any]) -> SamplingParams:
        constraint = frame.get("constraint")
        return cls(
            max_tokens=frame["max_tokens"],
            temperature=float(frame["temperature"]),
            top_p=float(frame["top_p"]),
            stop=tuple(frame["stop"]),
            seed=frame["seed"],
            n=int(frame["n"]),
            logprobs=frame.get("logprobs"),
            echo=bool(frame.get("echo", False)),
            constraint=Constraint.from_wire(constraint) if constraint is not None else None,
        )


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number", param=name, code="invalid_value")
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InvalidRequest(f"{name} must be in {bound}, got {value}", param=name,
                             code="invalid_value")
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer", param=name, code="invalid_value")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidRequest(f"{name} must be {bound}, got {value}", param=name,
                             code="invalid_value")
    return value


def parse_sampling(body: dict[str, Any], *, completion: bool = False,
                   constraint: Constraint | None = None) -> SamplingParams:
    """The sampling values of an OpenAI chat (or, with `completion`, legacy completion) body;
    InvalidRequest (400) when one is out of range, naming it in `param`. A legacy completion
    may ask for `max_tokens: 0` (OpenAI's minimum there: scoring tools send it with `echo`);
    chat needs at least 1. `constraint` is the chat request's output format
    (`parse_chat_format`)."""
    least = 0 if completion else 1
    max_tokens = _integer(body, "max_completion_tokens", least)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", least)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    n = _integer(body, "n", 1, MAX_N) or 1
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    raw_stop = body.get("stop")
    if raw_stop is None:
        stop: tuple[str, ...] = ()
    elif isinstance(raw_stop, str):
        stop = (raw_stop,) if raw_stop else ()
    elif isinstance(raw_stop, list) and all(isinstance(s, str) for s in raw_stop):
        if len(raw_stop) > MAX_STOP:
            raise InvalidRequest(f"stop takes at most {MAX_STOP} sequences", param="stop",
                                 code="invalid_value")
        stop = tuple(s for s in raw_stop if s)
    else:
        raise InvalidRequest("stop must be a string or a list of strings", param="stop",
                             code="invalid_value")
    if completion:
        logprobs = _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
        echo = body.get("echo")
        if echo is not None and not isinstance(echo, bool):
            raise InvalidRequest("echo must be a boolean", param="echo", code="invalid_value")
        echo = bool(echo)
    else:
        logprobs = _chat_logprobs(body)
        echo = False
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n,
        logprobs=logprobs, echo=echo, constraint=constraint,
    )


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise InvalidRequest("logprobs must be a boolean", param="logprobs", code="invalid_value")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if not wanted:
        if top:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs",
                                 code="invalid_value")
        return None
    return top or 0


def _schema_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON schema object", param=param,
                             code="invalid_value")
    return value


def parse_tools(body: dict[str, Any]) -> tuple[tuple[ToolSpec, ...], str | None]:
    """The function tools of a chat body and its tool choice: None (no tools offered, or
    `none`), "auto", "required", or the name of the function that must be called."""
    raw = body.get("tools")
    tools: list[ToolSpec] = []
    if raw is not None:
        if not isinstance(raw, list):
            raise InvalidRequest("tools must be a list", param="tools")
        for i, tool in enumerate(raw):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise InvalidRequest("local models take function tools only", param=where)
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                    or not function["name"]:
                raise InvalidRequest(f"{where}.function.name must be a non-empty string",
                                     param=f"{where}.function.name")
            description = function.get("description")
            if description is not None and not isinstance(description, str):
                raise InvalidRequest(f"{where}.function.description must be a string",
                                     param=f"{where}.function.description")
            parameters = function.get("parameters")
            if parameters is not None:
                parameters = _schema_object(parameters, f"{where}.function.parameters")
            tools.append(ToolSpec(i, function["name"], description, parameters))
    choice = body.get("tool_choice")
    if choice is None:
        return tuple(tools), "auto" if tools else None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest("tool_choice must be none, auto, required or a function",
                                 param="tool_choice", code="invalid_value")
        if choice == "none":
            return tuple(tools), None
        if not tools:
            raise InvalidRequest(f"tool_choice {choice!r} needs tools", param="tool_choice")
        return tuple(tools), choice
    name = None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
    if not isinstance(name, str):
        raise InvalidRequest("tool_choice must be none, auto, required or "
                             '{"type": "function", "function": {"name": ...}}',
                             param="tool_choice", code="invalid_value")
    if name not in {t.name for t in tools}:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools",
                             param="tool_choice")
    return tuple(tools), name


def parse_chat_format(body: dict[str, Any], tools: tuple[ToolSpec, ...],
                      tool_choice: str | None) -> Constraint | None:
    """The constraint a chat body asks for: a forced tool call (`tool_choice` required or a
    named function) wins over `response_format`; None when the output is free text."""
    if tool_choice is not None and tool_choice != "auto":
        allowed = tools if tool_choice == "required" else tuple(
            t for t in tools if t.name == tool_choice)
        return Constraint("tool_call", tools=allowed)
    raw = body.get("response_format")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest("response_format must be an object", param="response_format")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest("response_format.json_schema must be an object",
                                 param="response_format.json_schema")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("response_format.json_schema.name must be a non-empty string",
                                 param="response_format.json_schema.name")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest("response_format.json_schema.strict must be a boolean",
                                 param="response_format.json_schema.strict")
        schema = spec.get("schema")
        if schema is None:
            return Constraint("json_object")  # OpenAI: no schema means any JSON object
        schema = _schema_object(schema, "response_format.json_schema.schema")
        return Constraint("json_schema", schema=schema, strict=bool(strict))
    raise InvalidRequest("response_format.type must be text, json_object or json_schema",
                         param="response_format.type", code="invalid_value")


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages reduced to role + text, what a chat template takes. Content parts other
    than text (images) are refused: local text models cannot read them."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must have a role", param=f"messages[{i}]")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidRequest(
                        "local models take text content only",
                        param=f"messages[{i}].content",
                    )
                parts.append(str(part.get("text", "")))
            text = "".join(parts)
        else:
            raise InvalidRequest(f"messages[{i}].content must be text",
                                 param=f"messages[{i}].content")
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and isinstance(calls, list):
            # Earlier calls go back into the transcript in the format the model writes them.
            rendered = []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise InvalidRequest("a tool call needs function.name",
                                         param=f"messages[{i}].tool_calls[{j}]")
                arguments = function.get("arguments")
                rendered.append(render_call(function["name"],
                                            arguments if isinstance(arguments, str) else ""))
            text = "\n".join([text, *rendered] if text else rendered)
        out.append({"role": message["role"], "content": text})
    return out


def _is_token_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _texts_or_token_ids(raw: Any, param: str) -> list[str] | list[list[int]]:
    """OpenAI's four input forms: a string, a list of strings, one list of token ids, or a
    list of token id lists; always returned as a list (of strings or of id lists)."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(s, str) for s in raw):
            return list(raw)
        if _is_token_ids(raw):
            return [list(raw)]
        if all(_is_token_ids(r) for r in raw):
            return [list(r) for r in raw]
    raise InvalidRequest(f"{param} must be a string, a list of strings, a list of token ids "
                         "or a list of token id lists", param=param)


def completion_prompts(body: dict[str, Any]) -> list[str] | list[list[int]]:
    """The prompts of a legacy completion request: each string or token-id list is one
    prompt (OpenAI answers `n` choices for each, numbered prompt by prompt)."""
    return _texts_or_token_ids(body.get("prompt"), "prompt")


def embedding_inputs(body: dict[str, Any]) -> list[str] | list[list[int]]:
    return _texts_or_token_ids(body.get("input"), "input")


def check_token_ids(inputs: list[str] | list[list[int]], vocab: int, param: str) -> None:
    """Token ids must name tokens of the model's vocabulary (0 .. vocab - 1)."""
    items: list[Any] = list(inputs)
    for i, item in enumerate(items):
        if isinstance(item, str):
            return
        for token in item:
            if not 0 <= token < vocab:
                raise InvalidRequest(
                    f"{param}[{i}] holds token id {token}, outside this model's vocabulary "
                    f"(ids 0 to {vocab - 1})", param=param, code="invalid_value")
