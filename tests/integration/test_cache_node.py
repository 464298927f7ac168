"""The response cache in a real `meshnode run` process (built by `Node`), through the official
`openai` client: a deterministic repeat is a free hit, a sampled request is not cached, and
`cache.enabled: false` turns it off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "what is the capital of France?"}]


def config(upstream: FakeOpenAIProcess, *, cache_enabled: bool) -> dict[str, Any]:
    return {
        "mesh": {"enabled": False, "mdns": False},
        "cache": {"enabled": cache_enabled},
        "providers": {
            "up": {
                "type": "openai_compatible",
                "base_url": upstream.base_url,
                "credentials": {"api_key": "sk-upstream"},
                "models": [{"name": "gpt-4o", "openai_model": "gpt-4o",
                            "cost_per_1k_tokens": 0.01}],
            }
        },
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess() as fake:
        yield fake


def x_aiproxy(obj: Any) -> dict[str, Any]:
    block: dict[str, Any] = (obj.model_extra or {})["x_aiproxy"]
    return block


@pytest.mark.parametrize("enabled", [True, False])
def test_deterministic_repeat_is_a_free_hit_only_when_enabled(
    upstream: FakeOpenAIProcess, tmp_path: Path, enabled: bool
) -> None:
    upstream.reset()
    upstream.script(Behaviour.ok(text="Paris", times=3))
    with NodeProcess(config(upstream, cache_enabled=enabled), tmp_path) as node:
        client = openai.OpenAI(base_url=node.base_url, api_key="sk-x", max_retries=0, timeout=30)
        first = client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0)
        second = client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0)
        assert first.choices[0].message.content == second.choices[0].message.content == "Paris"
        assert x_aiproxy(first)["cost"] > 0
        if enabled:
            assert x_aiproxy(second).get("cache") == "hit"
            assert x_aiproxy(second)["cost"] == 0
            assert len(upstream.requests()) == 1
        else:
            assert "cache" not in x_aiproxy(second)
            assert len(upstream.requests()) == 2
        # sampled: never cached without an opt-in
        client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0.7)
        client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0.7)
        assert len(upstream.requests()) == (3 if enabled else 4)
