"""The embedded default's real models (smollm2 + minilm) through a real node process, with the
official `openai` Python client and openai-node; every body and stream chunk is checked against
OpenAI's published schemas (tests/kit/openai_schemas.py). Legacy completions (prompt lists,
token ids, `max_tokens: 0`) are tested on tiny-gpt2 in test_local_openai.py: they need no real
model, and a smollm2 token costs a few hundred ms on this CPU.

One node for the module: it serves the embedded default's local models, plus `smol-file`, the
same GGUF named by `path:` (so the second load of one file must come from the cache). Its
`data_dir/models` is a link to a directory in pytest's cache, so the dequantised smollm2 is
written once per checkout (the first run of this module pays the dequantising, later runs read
the cache; the log says which, and the test checks the log against what was there before).
openai-node (`npm install openai@<pinned>`, tests/kit/openai_node.py) goes into pytest's cache
(`.pytest_cache/`, git-ignored), once; without node or npm that test is skipped and says which
is missing.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from meshnode.config import embedded_default
from meshnode.worker.builtins import minilm_dir, smollm2_gguf
from meshnode.worker.gguf import cache_dir
from tests.kit.node_proc import NodeProcess
from tests.kit.openai_node import kept_dir, openai_node_folder
from tests.kit.openai_schemas import validate
from tests.kit.wait import wait_for_sync

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
def _config() -> dict[str, Any]:
    providers = embedded_default({})["providers"]
    local = providers["local"]
    assert {m["builtin"] for m in local["models"]} == {"smollm2", "minilm"}
    local["device"] = "cpu"
    local["models"].append({"name": "smol-file", "path": str(smollm2_gguf()), "kind": "chat"})
    # No answer cache: every answer here must come from the model (a replayed one would make
    # the seeded test pass trivially).
    return {"mesh": {"enabled": False, "mdns": False}, "cache": {"enabled": False},
            "providers": providers}


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=5) as r:  # noqa: S310
            return bool(r.status == 200)
    except urllib.error.HTTPError:
        return False


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    models = kept_dir(request, tmp_path_factory, "meshnode-models")
    workdir = tmp_path_factory.mktemp("smollm2-node")
    (workdir / "node-data").mkdir()
    (workdir / "node-data" / "models").symlink_to(models, target_is_directory=True)
    cached = (cache_dir(smollm2_gguf(), workdir / "node-data") / "config.json").is_file()
    with NodeProcess(_config(), workdir, startup_timeout=120) as n:
        wait_for_sync(lambda: _ready(n.url), "the worker loaded smollm2", timeout=300)
        n.cached_before = cached  # type: ignore[attr-defined]
        yield n


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0)


def _ask(client: openai.OpenAI, **extra: Any) -> dict[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=CAPITAL, **extra)  # type: ignore[arg-type]
    body: dict[str, Any] = json.loads(raw.content)
    validate("CreateChatCompletionResponse", body)
    return body


@pytest.fixture(scope="module")
def paris(client: openai.OpenAI) -> dict[str, Any]:
    """The greedy answer to the capital question (asked once: a CPU answer takes seconds)."""
    return _ask(client, temperature=0, max_tokens=32)


def test_capital_of_france_is_paris(paris: dict[str, Any]) -> None:
    body = paris
    (choice,) = body["choices"]
    assert "Paris" in choice["message"]["content"]
    assert choice["message"]["refusal"] is None
    assert choice["finish_reason"] == "stop"  # the model ended its answer itself
    assert body["system_fingerprint"].startswith("fp_")
    assert body["x_aiproxy"]["provider"] == "local"


def test_the_stream_says_paris_too_and_every_chunk_is_valid(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="smollm2", messages=CAPITAL, temperature=0, max_tokens=32,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = ""
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        assert chunk["system_fingerprint"].startswith("fp_")
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
    assert chunks[0]["choices"][0]["delta"]["refusal"] is None
    assert "Paris" in text
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_a_seeded_sampled_answer_is_reproducible(client: openai.OpenAI) -> None:
    first = _ask(client, temperature=0.7, seed=1234, max_tokens=8)
    second = _ask(client, temperature=0.7, seed=1234, max_tokens=8)
    assert first["choices"][0]["message"]["content"]
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["system_fingerprint"] == second["system_fingerprint"]


def test_a_gguf_path_loads_from_the_same_cache_and_answers_alike(
    node: NodeProcess, client: openai.OpenAI, paris: dict[str, Any]
) -> None:
    by_file = client.chat.completions.create(
        model="smol-file", messages=CAPITAL, temperature=0, max_tokens=32)  # type: ignore[arg-type]
    assert by_file.choices[0].message.content == paris["choices"][0]["message"]["content"]
    logs = node.logs()
    first = "cached" if node.cached_before else "dequantising GGUF"  # type: ignore[attr-defined]
    assert f"model smollm2: {first}" in logs
    assert "model smol-file: cached" in logs  # the same file, so the same cache: not again
    assert "loaded model smollm2 from" in logs


# --------------------------------------------------------------------------- embeddings
TEXTS = ["a cat sits on the mat", "quarterly tax filing deadlines"]


def _embed(client: openai.OpenAI, **body: Any) -> dict[str, Any]:
    raw = client.embeddings.with_raw_response.create(model="minilm", **body)
    out: dict[str, Any] = json.loads(raw.content)
    return out


@pytest.fixture(scope="module")
def float_vectors(client: openai.OpenAI) -> list[list[float]]:
    out = _embed(client, input=TEXTS, encoding_format="float")
    validate("CreateEmbeddingResponse", out)
    vectors = [d["embedding"] for d in out["data"]]
    assert [len(v) for v in vectors] == [384, 384]
    return vectors


def _decode(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_base64_embeddings_decode_to_the_float_answer(
    client: openai.OpenAI, float_vectors: list[list[float]]
) -> None:
    out = _embed(client, input=TEXTS, encoding_format="base64")
    assert all(isinstance(d["embedding"], str) for d in out["data"])
    assert [_decode(d["embedding"]) for d in out["data"]] == float_vectors
    # OpenAI's schema describes the float form; the decoded answer must fit it.
    validate("CreateEmbeddingResponse", {**out, "data": [
        {**d, "embedding": _decode(d["embedding"])} for d in out["data"]]})
    # The Python client's own default asks for base64 too and decodes it.
    default = client.embeddings.create(model="minilm", input=TEXTS)
    assert [d.embedding for d in default.data] == float_vectors


def test_token_id_inputs_embed_as_their_text(
    client: openai.OpenAI, float_vectors: list[list[float]]
) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128 for training; OpenAI clients send bare ids
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in TEXTS]
    out = _embed(client, input=ids, encoding_format="float")
    validate("CreateEmbeddingResponse", out)
    for got, want in zip((d["embedding"] for d in out["data"]), float_vectors, strict=True):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    single = _embed(client, input=ids[0], encoding_format="float")
    assert len(single["data"]) == 1
    for bad in ([[101, 30522]], [-1, 5]):
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model="minilm", input=bad)  # type: ignore[arg-type]
        assert info.value.body["param"] == "input"  # type: ignore[index]
        assert "vocabulary" in info.value.body["message"]  # type: ignore[index]


def test_dimensions_on_minilm_is_refused_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input="hello", dimensions=128)
    assert info.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "does not support" in info.value.body["message"]  # type: ignore[index]


@pytest.fixture(scope="module")
def openai_node(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    return openai_node_folder(request, tmp_path_factory)


def test_openai_node_default_embeddings_call_gets_the_same_floats(
    node: NodeProcess, openai_node: Path, float_vectors: list[list[float]]
) -> None:
    script = (
        "import OpenAI from 'openai';\n"
        f"const client = new OpenAI({{baseURL: {json.dumps(node.base_url)}, apiKey: 'unused'}});\n"
        f"const out = await client.embeddings.create({{model: 'minilm', input: {json.dumps(TEXTS)}}});\n"
        "console.log(JSON.stringify(out.data.map(d => Array.from(d.embedding))));\n"
    )
    (openai_node / "embed.mjs").write_text(script, encoding="utf-8")
    run = subprocess.run(["node", str(openai_node / "embed.mjs")], capture_output=True,
                         text=True, timeout=60, cwd=openai_node)
    assert run.returncode == 0, run.stderr
    vectors = json.loads(run.stdout)
    assert [len(v) for v in vectors] == [384, 384]
    assert vectors == float_vectors


# --------------------------------------------------------------------------- constrained, logprobs
CAPITAL_SCHEMA = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 40},
                                                   "capital": {"type": "string", "maxLength": 40}},
                  "required": ["country", "capital"], "additionalProperties": False}
WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}


def test_a_json_schema_answer_validates_and_is_right(client: openai.OpenAI) -> None:
    import jsonschema

    body = _ask(client, temperature=0, max_tokens=40, response_format={
        "type": "json_schema",
        "json_schema": {"name": "capital", "schema": CAPITAL_SCHEMA, "strict": True}})
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    answer = json.loads(choice["message"]["content"])
    jsonschema.validate(answer, CAPITAL_SCHEMA)
    assert "Paris" in answer["capital"]


def test_tool_choice_required_yields_a_valid_call_with_logprobs(client: openai.OpenAI) -> None:
    import jsonschema

    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", temperature=0, max_tokens=40, tools=[WEATHER_TOOL],
        tool_choice="required", logprobs=True, top_logprobs=3,
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}])
    body: dict[str, Any] = json.loads(raw.content)
    validate("CreateChatCompletionResponse", body)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
    assert "Paris" in arguments["city"]
    entries = choice["logprobs"]["content"]
    assert entries
    for entry in entries:
        assert math.exp(entry["logprob"]) <= 1.0
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: its own top-1
