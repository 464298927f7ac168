"""The cloud adapters through a real node process started from the seed's full example config.

One node (`meshnode run`) and four vendor fakes, each in its own process, for the whole module:
Anthropic (`tests.kit.fake_anthropic`), Cloudflare Workers AI (`tests.kit.fake_cloudflare`),
OpenAI and Together (two `tests.kit.fake_openai` servers). The fakes check what the node sends
them (path, headers, body shape) and record it; each test scripts them over HTTP.

The config is `deploy/config/full.yaml` as the seed wrote it (every section, `${VAR}`
credentials expanded by the node from its environment, which holds fake keys), changed only
where a test on a shared machine must:
- `base_url`s point at the fakes; the mesh stays on loopback (no seeds, no mDNS, gRPC on port
  0); the local chat model's `path` is a tiny random checkpoint built here (the example's
  `/models/llama-3-8b` does not exist on a test machine);
- a few models are added: `relay`, `relay-stream` and `relay-event` (served by Anthropic,
  Cloudflare and OpenAI, cheapest first, one per failover test: a failure cools its offer down), `cf-llama` (Cloudflare only: the example's `llama-3.1-8b` goes
  to Together, which is cheaper), `sdxl` (a Cloudflare image model), and a provider `tg` of the
  `together` preset with no credentials (its key comes from TOGETHER_API_KEY).

The node's answer cache is on (as in the example), so every prompt here is unique.
"""

from __future__ import annotations

import base64
import copy
import itertools
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from meshnode.config import read_document
from tests.kit import fake_anthropic as fa
from tests.kit import fake_cloudflare as fc
from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.fake_process import FakeServerProcess
from tests.kit.node_proc import REPO_ROOT, NodeProcess

pytestmark = pytest.mark.slow

FULL_EXAMPLE = REPO_ROOT / "deploy" / "config" / "full.yaml"
OPENAI_KEY = "sk-openai-fake"
TOGETHER_KEY = "tg-fake-key"
CF_CHAT = "@cf/meta/llama-3.3-70b-instruct-fp8-fast"
CF_IMAGE = "@cf/stabilityai/stable-diffusion-xl-base-1.0"
WEATHER = {"name": "weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
OPENAI_WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather in a city",
    "parameters": WEATHER["input_schema"]}}
_unique = itertools.count(1)


def prompt(text: str) -> str:
    """A prompt no earlier request used (the node's cache is on)."""
    return f"{text} #{next(_unique)}"


@dataclass
class Cloud:
    node: NodeProcess
    anthropic: FakeServerProcess
    cloudflare: FakeServerProcess
    openai: FakeOpenAIProcess
    together: FakeOpenAIProcess

    def oa(self) -> openai.OpenAI:
        return openai.OpenAI(api_key="unused", base_url=self.node.base_url, max_retries=0,
                             timeout=60)

    def an(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key="unused", base_url=self.node.url, max_retries=0,
                                   timeout=60)

    def seen(self) -> dict[str, int]:
        """How many requests each fake has accepted so far."""
        return {
            "anthropic": len(self.anthropic.recorded()["requests"]),
            "cloudflare": len(self.cloudflare.recorded()["requests"]),
            "openai": len(self.openai.requests()),
            "together": len(self.together.requests()),
        }


def full_example(cloud: dict[str, str], tiny_model: Path) -> dict[str, Any]:
    """The seed's full example, pointed at the fakes (see the module docstring)."""
    doc = copy.deepcopy(read_document(FULL_EXAMPLE))
    doc["mesh"].update(seeds=[], mdns=False)
    providers = doc["providers"]
    providers["local"]["models"][0]["path"] = str(tiny_model)
    providers["anthropic"]["base_url"] = cloud["anthropic"]
    providers["cloudflare"]["base_url"] = cloud["cloudflare"]
    providers["openai"]["base_url"] = cloud["openai"]
    providers["together"]["base_url"] = cloud["together"]
    for name in ("relay", "relay-stream", "relay-event"):
        providers["anthropic"]["models"].append(
            {"name": name, "anthropic_model": "claude-3-5-haiku-latest",
             "cost_per_1k_tokens": 0.0001})
        providers["cloudflare"]["models"].append(
            {"name": name, "cloudflare_model": CF_CHAT, "cost_per_1k_tokens": 0.0002})
        providers["openai"]["models"].append(
            {"name": name, "openai_model": "gpt-4o-mini", "cost_per_1k_tokens": 0.0003})
    providers["cloudflare"]["models"] += [
        {"name": "cf-llama", "cloudflare_model": CF_CHAT, "cost_per_1k_tokens": 0.0005},
        {"name": "sdxl", "cloudflare_model": CF_IMAGE, "cost_per_1k_tokens": 0.002},
    ]
    providers["tg"] = {"type": "together", "priority": 6, "base_url": cloud["together"],
                       "models": [{"name": "tg-llama", "openai_model": "Qwen/Qwen2.5-7B",
                                   "cost_per_1k_tokens": 0.0002}]}
    doc["routing"]["failover"]["fallback_chain"].insert(-1, "tg")
    return doc


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    from meshnode.worker.builtins import tiny_gpt2_dir

    workdir = tmp_path_factory.mktemp("cloud-nodes")
    tiny_model = tiny_gpt2_dir(workdir)
    with FakeServerProcess("tests.kit.fake_anthropic") as an_fake, \
            FakeServerProcess("tests.kit.fake_cloudflare") as cf_fake, \
            FakeOpenAIProcess(require_key=OPENAI_KEY) as oa_fake, \
            FakeOpenAIProcess(require_key=TOGETHER_KEY) as tg_fake:
        config = full_example({"anthropic": an_fake.url, "cloudflare": cf_fake.url,
                               "openai": oa_fake.base_url, "together": tg_fake.base_url},
                              tiny_model)
        env = {"ANTHROPIC_API_KEY": fa.API_KEY, "OPENAI_API_KEY": OPENAI_KEY,
               "CLOUDFLARE_ACCOUNT_ID": fc.ACCOUNT_ID, "CLOUDFLARE_API_TOKEN": fc.API_TOKEN,
               "TOGETHER_API_KEY": TOGETHER_KEY}
        with NodeProcess(config, workdir, grpc_listen="127.0.0.1:0", env=env,
                         startup_timeout=120) as node:
            yield Cloud(node, an_fake, cf_fake, oa_fake, tg_fake)
        assert an_fake.recorded()["violations"] == []
        assert cf_fake.recorded()["violations"] == []


def x_aiproxy(model: Any) -> dict[str, Any]:
    extra: dict[str, Any] = model.model_extra or {}
    return dict(extra["x_aiproxy"])


# --------------------------------------------------------------------------- the node starts
def test_full_example_starts_and_lists_every_cloud_model(cloud: Cloud) -> None:
    models = {m.id for m in cloud.oa().models.list()}
    assert {"claude-sonnet-4", "gpt-4o", "llama-3.1-8b", "cf-llama", "tg-llama", "sdxl",
            "llama-3-8b", "minilm", "relay"} <= models
    # credentials came from the environment through `${VAR}`: every cloud provider is on
    try:
        with urllib.request.urlopen(cloud.node.url + "/health/ready", timeout=30) as r:  # noqa: S310
            ready = orjson.loads(r.read())
    except urllib.error.HTTPError as exc:  # 503 while the local worker still warms up
        ready = orjson.loads(exc.read())
    for provider in ("anthropic", "cloudflare", "openai", "together", "tg"):
        assert ready["providers"][provider]["ready"] is True, ready


# --------------------------------------------------------------------------- each adapter
ADAPTERS = [
    # (model, provider that serves it, fake, upstream model the fake must see)
    ("claude-sonnet-4", "anthropic", "anthropic", "claude-sonnet-4-20250514"),
    ("cf-llama", "cloudflare", "cloudflare", CF_CHAT),
    ("gpt-4o", "openai", "openai", "gpt-4o"),
    ("llama-3.1-8b", "together", "together", "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"),
    ("tg-llama", "tg", "together", "Qwen/Qwen2.5-7B"),
]


def last_upstream_request(cloud: Cloud, fake: str) -> tuple[str, dict[str, Any]]:
    """(upstream model, body) of the last request the fake accepted."""
    if fake == "anthropic":
        body = cloud.anthropic.recorded()["requests"][-1]
        return body["model"], body
    if fake == "cloudflare":
        entry = cloud.cloudflare.recorded()["requests"][-1]
        return entry["model"], entry["body"]
    recorded = (cloud.openai if fake == "openai" else cloud.together).requests()[-1]
    return recorded["json"]["model"], recorded["json"]


@pytest.mark.parametrize(("model", "provider", "fake", "upstream"), ADAPTERS)
def test_openai_client_through_the_node_to_each_adapter(
    cloud: Cloud, model: str, provider: str, fake: str, upstream: str
) -> None:
    client = cloud.oa()
    text = prompt("hello mesh")
    before = cloud.seen()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}])
    answer = raw.parse()
    assert raw.headers["x-aiproxy-provider"] == provider
    assert answer.choices[0].finish_reason == "stop"
    content = answer.choices[0].message.content
    assert content
    if fake in ("anthropic", "cloudflare"):
        assert content == f"echo: {text}"  # those fakes echo the prompt they were sent
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    x = x_aiproxy(answer)
    assert (x["provider"], x["model"]) == (provider, model)
    assert x["attempts"][-1]["provider"] == provider and len(x["attempts"]) == 1
    # Workers AI gave no usage: the tokens were counted here and the cost says so
    assert x.get("cost_estimated", False) is (provider == "cloudflare")
    assert cloud.seen()[fake] == before[fake] + 1
    seen_model, body = last_upstream_request(cloud, fake)
    assert seen_model == upstream
    assert text in orjson.dumps(body).decode()

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text + " (stream)"}], stream=True,
        stream_options={"include_usage": True})
    streamed, finish, usage, last_extra = "", None, None, None
    for chunk in stream:
        if chunk.choices:
            streamed += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
        last_extra = chunk.model_extra
    assert streamed
    if fake in ("anthropic", "cloudflare"):
        assert streamed == f"echo: {text} (stream)"
    assert finish == "stop" and usage is not None and usage.completion_tokens > 0
    streamed_x = (last_extra or {})["x_aiproxy"]
    assert streamed_x["provider"] == provider
    assert streamed_x.get("cost_estimated", False) is (provider == "cloudflare")
    assert cloud.seen()[fake] == before[fake] + 2
    assert last_upstream_request(cloud, fake)[1].get("stream") is True


def test_keys_reach_each_vendor_in_its_own_header(cloud: Cloud) -> None:
    cloud.oa().chat.completions.create(
        model="tg-llama", messages=[{"role": "user", "content": prompt("key check")}])
    assert cloud.together.requests()[-1]["headers"]["authorization"] == f"Bearer {TOGETHER_KEY}"
    cloud.oa().chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": prompt("key check")}])
    assert cloud.openai.requests()[-1]["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    # Anthropic and Cloudflare fakes refuse (and record as violations) a wrong key or token;
    # the module fixture asserts they recorded none.


# --------------------------------------------------------------------------- failover
def test_failover_anthropic_529_then_cloudflare_then_openai(cloud: Cloud) -> None:
    cloud.anthropic.script(fa.behaviour_to_json(fa.Fail(529)))
    cloud.cloudflare.script(fc.behaviour_to_json(fc.Fail(429)))
    before = cloud.seen()
    answer = cloud.oa().chat.completions.create(
        model="relay", messages=[{"role": "user", "content": prompt("fail over")}])
    x = x_aiproxy(answer)
    assert [(a["provider"], a["outcome"] == "ok") for a in x["attempts"]] == [
        ("anthropic", False), ("cloudflare", False), ("openai", True)]
    assert x["provider"] == "openai"
    assert len(answer.choices) == 1 and answer.choices[0].message.content
    after = cloud.seen()
    assert {k: after[k] - before[k] for k in after} == {
        "anthropic": 1, "cloudflare": 1, "openai": 1, "together": 0}
    assert cloud.openai.requests()[-1]["json"]["model"] == "gpt-4o-mini"


def test_failover_in_a_stream_happens_before_the_first_byte(cloud: Cloud) -> None:
    cloud.anthropic.script(fa.behaviour_to_json(fa.Fail(529)))
    cloud.cloudflare.script(fc.behaviour_to_json(fc.Fail(500)))
    cloud.openai.script(Behaviour.ok(text="one clean answer", model="gpt-4o-mini"))
    stream = cloud.oa().chat.completions.create(
        model="relay-stream", messages=[{"role": "user", "content": prompt("fail over")}],
        stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one clean answer"
    x = (chunks[-1].model_extra or {})["x_aiproxy"]
    assert [a["provider"] for a in x["attempts"]] == ["anthropic", "cloudflare", "openai"]


def test_anthropic_error_event_before_any_content_fails_over(cloud: Cloud) -> None:
    # a 200 stream whose first event after message_start is `error` (overloaded): nothing
    # reached the client yet, so the router may still try the next provider
    cloud.anthropic.script(fa.behaviour_to_json(fa.Reply(text="never", error_event_after=0)))
    stream = cloud.oa().chat.completions.create(
        model="relay-event", messages=[{"role": "user", "content": prompt("event")}],
        stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    x = (chunks[-1].model_extra or {})["x_aiproxy"]
    assert [(a["provider"], a["outcome"] == "ok") for a in x["attempts"]] == [
        ("anthropic", False), ("cloudflare", True)]
    assert text.startswith("echo: ") and "never" not in text


# --------------------------------------------------------------------------- broken streams
def raw_stream(cloud: Cloud, body: dict[str, Any], path: str = "/v1/chat/completions") -> str:
    request = urllib.request.Request(cloud.node.url + path, data=orjson.dumps(body),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
        assert response.status == 200
        return bytes(response.read()).decode()


def test_stream_broken_after_first_chunk_ends_with_an_error_event(cloud: Cloud) -> None:
    cloud.anthropic.script(fa.behaviour_to_json(
        fa.Reply(text="alpha beta gamma delta", break_after=1)))
    before = cloud.seen()
    raw = raw_stream(cloud, {"model": "claude-sonnet-4", "stream": True,
                             "messages": [{"role": "user", "content": prompt("break")}]})
    events = [e for e in raw.split("\n\n") if e]
    assert "[DONE]" not in raw
    assert '"error"' in events[-1]
    texts = [orjson.loads(e.removeprefix("data: "))["choices"][0]["delta"].get("content", "")
             for e in events[:-1]]
    assert "".join(texts) == "alpha "  # once: not replayed, not served again elsewhere
    after = cloud.seen()
    assert {k: after[k] - before[k] for k in after} == {
        "anthropic": 1, "cloudflare": 0, "openai": 0, "together": 0}

    # the official client raises, after the text it got
    cloud.cloudflare.script(fc.behaviour_to_json(fc.Reply(text="one two three", break_after=1)))
    stream = cloud.oa().chat.completions.create(
        model="cf-llama", messages=[{"role": "user", "content": prompt("break")}], stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "one "


def test_door_stream_broken_after_first_chunk_ends_with_an_error_event(cloud: Cloud) -> None:
    cloud.anthropic.script(fa.behaviour_to_json(
        fa.Reply(text="alpha beta gamma delta", break_after=1)))
    raw = raw_stream(cloud, {"model": "claude-sonnet-4", "max_tokens": 64, "stream": True,
                             "messages": [{"role": "user", "content": prompt("break")}]},
                     "/v1/messages")
    events = [e for e in raw.split("\n\n") if e]
    names = [e.split("\n", 1)[0].removeprefix("event: ") for e in events]
    assert names[0] == "message_start" and names[-1] == "error"
    assert "message_stop" not in names
    deltas = [orjson.loads(e.split("data: ", 1)[1])["delta"]["text"]
              for e, n in zip(events, names, strict=True) if n == "content_block_delta"]
    assert deltas == ["alpha "]
    # the anthropic SDK raises on the error event, after the text it got
    cloud.anthropic.script(fa.behaviour_to_json(
        fa.Reply(text="alpha beta gamma delta", break_after=1)))
    got: list[str] = []
    with pytest.raises(anthropic.APIError), cloud.an().messages.stream(
        model="claude-sonnet-4", max_tokens=64,
        messages=[{"role": "user", "content": prompt("break")}],
    ) as stream:
        for piece in stream.text_stream:
            got.append(piece)
    assert "".join(got) == "alpha "


# --------------------------------------------------------------------------- images
def test_images_generations_returns_a_png_from_cloudflare(cloud: Cloud) -> None:
    raw = cloud.oa().images.with_raw_response.generate(
        model="sdxl", prompt=prompt("a red square"), size="512x512", response_format="b64_json")
    images = raw.parse()
    assert raw.headers["x-aiproxy-provider"] == "cloudflare"
    assert images.data is not None and len(images.data) == 1
    png = base64.b64decode(images.data[0].b64_json or "")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == fc.tiny_png()
    entry = cloud.cloudflare.recorded()["requests"][-1]
    assert entry["model"] == CF_IMAGE
    assert (entry["body"]["width"], entry["body"]["height"]) == (512, 512)
    assert x_aiproxy(images)["provider"] == "cloudflare"


# --------------------------------------------------------------------------- /v1/messages
def test_anthropic_client_against_messages_stream_and_not(cloud: Cloud) -> None:
    client = cloud.an()
    text = prompt("hi door")
    message = client.messages.create(
        model="claude-sonnet-4", max_tokens=64, system="Be brief.",
        messages=[{"role": "user", "content": text}])
    assert message.content[0].type == "text" and message.content[0].text == f"echo: {text}"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    assert x_aiproxy(message)["provider"] == "anthropic"
    sent = cloud.anthropic.recorded()["requests"][-1]
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 64
    assert sent["model"] == "claude-sonnet-4-20250514"

    with client.messages.stream(
        model="claude-sonnet-4", max_tokens=64,
        messages=[{"role": "user", "content": text + " (stream)"}],
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == f"echo: {text} (stream)"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_anthropic_client_counts_tokens(cloud: Cloud) -> None:
    counted = cloud.an().messages.count_tokens(
        model="claude-sonnet-4", system="Be brief.",
        messages=[{"role": "user", "content": "how many tokens is this sentence?"}])
    assert 5 <= counted.input_tokens <= 40


def test_anthropic_client_tool_round_trip(cloud: Cloud) -> None:
    cloud.anthropic.script(fa.behaviour_to_json(
        fa.Reply(text="", tool="weather", tool_input={"city": "Oslo"})))
    client = cloud.an()
    question = {"role": "user", "content": prompt("Weather in Oslo?")}
    first = client.messages.create(model="claude-sonnet-4", max_tokens=64, tools=[WEATHER],
                                   messages=[question])  # type: ignore[list-item]
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert (use.name, use.input) == ("weather", {"city": "Oslo"})
    sent = cloud.anthropic.recorded()["requests"][-1]
    assert sent["tools"] == [WEATHER]

    # the answer goes back with the id the upstream chose; the fake refuses a tool_result
    # whose tool_use_id matches no tool_use, so this checks the id survived both translations
    second = client.messages.create(
        model="claude-sonnet-4", max_tokens=64, tools=[WEATHER],  # type: ignore[list-item]
        messages=[question,
                  {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": use.id, "content": "-3C"}]}])
    assert second.content[0].type == "text" and second.content[0].text == "echo: -3C"
    sent_messages = cloud.anthropic.recorded()["requests"][-1]["messages"]
    assert sent_messages[1]["content"][0] == {
        "type": "tool_use", "id": use.id, "name": "weather", "input": {"city": "Oslo"}}
    assert sent_messages[2]["content"][0]["tool_use_id"] == use.id

    # the same call, streamed
    cloud.anthropic.script(fa.behaviour_to_json(
        fa.Reply(text="", tool="weather", tool_input={"city": "Oslo"})))
    with client.messages.stream(
        model="claude-sonnet-4", max_tokens=64, tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": prompt("Weather in Oslo?")}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    streamed_use = next(b for b in final.content if b.type == "tool_use")
    assert (streamed_use.name, streamed_use.input) == ("weather", {"city": "Oslo"})


# --------------------------------------------------------------------------- Cloudflare tools
def test_cloudflare_tool_calls_streamed_to_both_clients(cloud: Cloud) -> None:
    cloud.cloudflare.script(fc.behaviour_to_json(
        fc.Reply(tool="weather", tool_input={"city": "Oslo"})))
    stream = cloud.oa().chat.completions.create(
        model="cf-llama", messages=[{"role": "user", "content": prompt("Weather in Oslo?")}],
        tools=[OPENAI_WEATHER], stream=True)  # type: ignore[list-item]
    names, arguments, finish = [], "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for call in chunk.choices[0].delta.tool_calls or ():
            if call.function and call.function.name:
                names.append(call.function.name)
            arguments += (call.function.arguments or "") if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["weather"] and orjson.loads(arguments) == {"city": "Oslo"}
    assert finish == "tool_calls"
    sent = cloud.cloudflare.recorded()["requests"][-1]["body"]
    assert sent["stream"] is True and sent["tools"][0]["name"] == "weather"

    # through the Anthropic door too (OpenAI chunks -> Anthropic tool_use events)
    cloud.cloudflare.script(fc.behaviour_to_json(
        fc.Reply(tool="weather", tool_input={"city": "Oslo"}, tool_style="flat")))
    with cloud.an().messages.stream(
        model="cf-llama", max_tokens=64, tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": prompt("Weather in Oslo?")}],
    ) as door:
        final = door.get_final_message()
    assert final.stop_reason == "tool_use"
    use = next(b for b in final.content if b.type == "tool_use")
    assert (use.name, use.input) == ("weather", {"city": "Oslo"})
