"""The `together` preset: a provider named `together` with only `models` (and `base_url`
pointed at the fake OpenAI server) is the OpenAI-compatible adapter with Together's key variable
filled in from the environment; nothing of the adapter is copied."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from meshnode.config import TimeoutsConfig, load_config
from meshnode.providers.openai_compat import OpenAICompatProvider
from meshnode.providers.registry import ProviderContext, build_providers
from meshnode.types import InferenceRequest, RequestKind
from tests.kit.fake_openai import FakeOpenAI

TIMEOUTS = TimeoutsConfig(connect_ms=5000, first_byte_ms=20000, total_ms=30000)
KEY = "together-test-key-123"


def write_config(tmp_path: Path, base_url: str | None) -> Path:
    provider: dict[str, object] = {"models": [
        {"name": "llama-3.1-8b", "openai_model": "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
         "cost_per_1k_tokens": 0.00018}]}
    if base_url is not None:
        provider["base_url"] = base_url
    path = tmp_path / "meshnode.yaml"
    path.write_text(yaml.safe_dump({"providers": {"together": provider}}))
    return path


def test_preset_fills_type_base_url_and_key(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, None), env={"TOGETHER_API_KEY": KEY})
    (resolved,) = config.resolved_providers()
    assert (resolved.name, resolved.type, resolved.preset) == (
        "together", "openai_compatible", "together")
    assert resolved.base_url == "https://api.together.xyz/v1"
    assert resolved.config.credentials["api_key"] == KEY


async def test_together_provider_serves_through_the_fake(tmp_path: Path) -> None:
    async with FakeOpenAI(require_key=KEY) as fake:
        config = load_config(write_config(tmp_path, fake.base_url),
                             env={"TOGETHER_API_KEY": KEY})
        (provider,) = build_providers(config, ProviderContext("n1", tmp_path, TIMEOUTS))
        assert isinstance(provider, OpenAICompatProvider)
        assert provider.name == "together" and provider.kind == "openai_compatible"
        (offer,) = provider.offers()
        await provider.start()
        try:
            body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}]}
            request = InferenceRequest(kind=RequestKind.CHAT, model="llama-3.1-8b", body=body,
                                       request_id="r1", deadline=time.monotonic() + 30)
            done = await provider.complete(request, offer, TIMEOUTS)
            chunks = [c async for c in provider.stream(request, offer, TIMEOUTS)]
        finally:
            await provider.close()
    assert done.body["choices"][0]["message"]["content"]
    assert chunks[-1].usage is not None
    sent = fake.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json["model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"


def test_together_without_key_is_disabled_not_fatal(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, None), env={})
    (provider,) = build_providers(config, ProviderContext("n1", tmp_path, TIMEOUTS))
    assert provider.offers() == ()
    assert provider.ready()[0] is False
