"""Generation parameters: parsed and checked from an OpenAI body, on the node side.

Torch-free on purpose: the node imports this to reject bad sampling values with a 400 before a
request ever reaches a worker. The worker receives the checked values in its `generate` frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshnode.errors import InvalidRequest

MAX_N = 16
MAX_STOP = 4


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1

    def to_wire(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
            "n": self.n,
        }

    @classmethod
    def from_wire(cls, frame: dict[str, Any]) -> SamplingParams:
        return cls(
            max_tokens=frame["max_tokens"],
            temperature=float(frame["temperature"]),
            top_p=float(frame["top_p"]),
            stop=tuple(frame["stop"]),
            seed=frame["seed"],
            n=int(frame["n"]),
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


def parse_sampling(body: dict[str, Any], *, completion: bool = False) -> SamplingParams:
    """The sampling values of an OpenAI chat or completion body; InvalidRequest (400) when one
    is out of range, naming it in `param`. A legacy completion may ask for `max_tokens: 0`
    (OpenAI's minimum there: scoring tools send it with `echo`); chat needs at least 1."""
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
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n
    )


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
