"""The adapter for OpenAI and every OpenAI-compatible server (Together, Groq, vLLM, Ollama...).

Owns: turning an `InferenceRequest` into the upstream call (`/chat/completions`,
`/completions`, `/embeddings`, `/images/generations`, non-stream and SSE stream) and the
answer back into `Completion` / `StreamChunk`s with `Usage`. HTTP, timeouts and the
translation of failures into `MeshError`s live in `providers/http.py`.

What goes upstream: the client's validated body as it is (tools, response_format, n, stop,
seed, user... pass through), with `model` set to the offer's upstream name, minus the fields in
`FORBIDDEN_FIELDS` (a client must never redirect our traffic or swap our credentials), and, when
streaming, `stream_options.include_usage=true` (we always want the usage; the API layer strips
the usage chunk when the client did not ask for it). The body is serialized once, with orjson;
the answer is parsed once and handed on as is.

Credentials: `credentials.api_key` is sent as `Authorization: Bearer ...`; `organization` and
`project` as OpenAI's headers; `headers` from the provider's config are sent as given. A provider
that needs a key and has an empty one (type `openai`, a preset such as `together`, or any
provider whose config names `api_key` but it expanded to "") logs one warning, offers no models
and reports not ready: the node still starts. An `openai_compatible` provider with no `api_key`
entry at all (a local vLLM or Ollama) sends no Authorization header.

Usage: the upstream's when given; otherwise estimated (`providers/tokens.py`) and marked
`Usage(estimated=True)`; a stream whose upstream sent no usage chunk ends with a synthesized one
(`choices: []`) so the router always learns the usage.

Must not touch: routing decisions, retries, the client's HTTP response (router and api/).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from meshnode.config import DEFAULT_BASE_URLS, ResolvedProvider, TimeoutsConfig
from meshnode.errors import InvalidRequest, MeshError, UpstreamUnavailable
from meshnode.providers import openai_responses
from meshnode.providers.anthropic_extensions import drop_extensions
from meshnode.providers.base import Provider
from meshnode.providers.h1 import H1Response
from meshnode.providers.http import (
    STREAM_ACCEPT,
    HttpUpstream,
    SseParser,
    as_stream_broken,
    request_id_headers,
)
from meshnode.providers.registry import ProviderContext
from meshnode.providers.tokens import (
    estimate_prompt_tokens,
    estimate_tokens,
    tokens_for_chars,
)
from meshnode.types import (
    REDIRECT_FIELDS,
    Completion,
    InferenceRequest,
    ModelOffer,
    RequestKind,
    StreamChunk,
    Usage,
)

log = logging.getLogger(__name__)

#: Body fields never sent upstream (see `meshnode.types.REDIRECT_FIELDS`).
FORBIDDEN_FIELDS = REDIRECT_FIELDS

PATHS: dict[RequestKind, str] = {
    RequestKind.CHAT: "/chat/completions",
    RequestKind.COMPLETION: "/completions",
    RequestKind.EMBEDDING: "/embeddings",
    RequestKind.IMAGE: "/images/generations",
}

# config `kind` -> what the offer serves. A chat model also serves /completions: vLLM, Ollama
# and Together do; OpenAI answers 404 for its chat models, which reaches the client as
# UpstreamBadRequest, the truth.
OFFER_KINDS: dict[str, frozenset[RequestKind]] = {
    "chat": frozenset({RequestKind.CHAT, RequestKind.COMPLETION}),
    "completion": frozenset({RequestKind.COMPLETION}),
    "embedding": frozenset({RequestKind.EMBEDDING}),
    "image": frozenset({RequestKind.IMAGE}),
}

# The kinds whose answer is a `data` list (the others': `choices`); a module constant, not
# enum members looked up per request.
_DATA_KINDS = frozenset({RequestKind.EMBEDDING, RequestKind.IMAGE})

# After `data: [DONE]`, how long to wait for the end of the body so the connection can go
# back to the pool (it is normally already there); past it the connection is dropped.
_DRAIN_AFTER_DONE_S = 0.5
# A stream's chunks are counted for a usage estimate this many at a time (see `stream`).
_COUNT_EVERY = 64


class OpenAICompatProvider(Provider):
    """One OpenAI-compatible upstream (see the module docstring)."""

    enforces_deadline = True  # every upstream call carries the request's deadline
    fixed_offers = True  # made from the config in __init__, never changed

    def __init__(self, resolved: ResolvedProvider, ctx: ProviderContext) -> None:
        self.name = resolved.name
        self.kind = resolved.type
        self._ctx = ctx
        cfg = resolved.config
        credentials = cfg.credentials
        api_key = credentials.get("api_key", "")
        needs_key = (
            resolved.type == "openai" or resolved.preset is not None or "api_key" in credentials
        )
        self.disabled_reason: str | None = None
        headers: dict[str, str] = {}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        elif needs_key:
            self.disabled_reason = (
                f"providers.{self.name}.credentials.api_key is empty "
                "(is its environment variable set?); this provider serves nothing"
            )
            log.warning("provider %s disabled: %s", self.name, self.disabled_reason)
        if credentials.get("organization"):
            headers["OpenAI-Organization"] = credentials["organization"]
        if credentials.get("project"):
            headers["OpenAI-Project"] = credentials["project"]
        headers.update(cfg.headers)  # the operator's own headers win
        # anything credential-like we send must never be echoed back to a client
        secrets = [api_key, *credentials.values(), *cfg.headers.values()]
        base_url = resolved.base_url or DEFAULT_BASE_URLS["openai"]
        self._http = HttpUpstream(
            provider=self.name,
            base_url=base_url,
            headers=headers,
            max_concurrency=cfg.max_concurrency,
            secrets=[s for s in secrets if len(s) >= 8],
        )
        self._offers: tuple[ModelOffer, ...] = ()
        if self.disabled_reason is None:
            self._offers = tuple(
                ModelOffer(
                    model=model.name,
                    provider=self.name,
                    provider_kind=self.kind,
                    upstream_model=model.openai_model or model.name,
                    kinds=OFFER_KINDS[model.kind],
                    cost_per_1k_input=model.input_price,
                    cost_per_1k_output=model.output_price,
                    priority=cfg.priority,
                    max_context_tokens=model.max_context_tokens,
                )
                for model in cfg.models
            )

    # ---- Provider interface
    def offers(self) -> Sequence[ModelOffer]:
        return self._offers

    def ready(self) -> tuple[bool, str]:
        if self.disabled_reason is not None:
            return False, self.disabled_reason
        return True, ""

    async def start(self) -> None:
        if self.disabled_reason is None:
            await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    def _native(self, request: InferenceRequest) -> Mapping[str, Any] | None:
        """The Responses body of a /v1/responses request, when this upstream speaks the
        Responses API natively (OpenAI itself; other compatible servers get the chat form)."""
        return openai_responses.native_body(request) if self.kind == "openai" else None

    async def complete(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> Completion:
        if self.kind == "openai":
            native = openai_responses.native_body(request)  # `_native`
            if native is not None:
                return await openai_responses.complete(self._http, self.name, request, offer,
                                                       timeouts, native)
        path = PATHS.get(request.kind) or _path(request.kind)
        payload = orjson.dumps(upstream_body(self._body(request), offer.upstream_model,
                                             stream=False))
        data = await self._http.post_json(
            path, payload, deadline=request.deadline, timeouts=timeouts,
            headers=request_id_headers(request.request_id),
        )
        if "error" in data and "choices" not in data and "data" not in data:
            raise self._error_event(data)
        expected = "data" if request.kind in _DATA_KINDS else "choices"
        if not isinstance(data.get(expected), list):
            raise UpstreamUnavailable(
                f"{self.name} answered without `{expected}`", provider=self.name
            )
        usage = parse_usage(data.get("usage"))
        if usage is None:
            usage = Usage(
                prompt_tokens=_prompt_estimate(request),
                completion_tokens=_completion_estimate(data),
                estimated=True,
            )
        return Completion(data, usage)  # (by position: keywords would cost a dict per call)

    async def stream(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> AsyncGenerator[StreamChunk, None]:
        if request.kind not in (RequestKind.CHAT, RequestKind.COMPLETION):
            raise InvalidRequest(f"{request.kind.value} requests cannot be streamed")
        native = self._native(request)
        if native is not None:
            async for native_chunk in openai_responses.stream(
                    self._http, self.name, request, offer, timeouts, native):
                yield native_chunk
            return
        path = _path(request.kind)
        payload = orjson.dumps(upstream_body(self._body(request), offer.upstream_model,
                                             stream=True))
        http = self._http
        started = False
        usage: Usage | None = None
        out_chars = 0
        # Chunks whose text is not counted yet: counted (for an estimate) only while no usage
        # has come, in batches, so a stream whose upstream reports usage skips the count.
        uncounted: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        loads = orjson.loads
        try:
            async with http.stream(
                path, payload, deadline=request.deadline, timeouts=timeouts,
                headers={**STREAM_ACCEPT, **request_id_headers(request.request_id)},
            ) as resp:
                # The events of each read, parsed once each; no generator per layer.
                parser = SseParser()
                read = resp.content.read_any
                done = False
                while True:
                    data = await read()
                    events = parser.feed_data(data) if data else parser.close_data()
                    one_line = parser.one_line  # (else each event is looked at for CR, LF)
                    for raw in events:
                        if raw == b"[DONE]":
                            done = True
                            break
                        try:
                            chunk = loads(raw)
                        except orjson.JSONDecodeError:
                            chunk = self._parse_text(raw)
                            text: bytes | None = None
                        else:
                            # relayed as it came, when it is one line of valid UTF-8
                            # (byte values: see http._LF)
                            text = raw if one_line or not (0x0A in raw or 0x0D in raw) else None
                        if type(chunk) is not dict:
                            raise UpstreamUnavailable(
                                f"{self.name} sent a stream event that is not a JSON object",
                                provider=self.name,
                            )
                        if "error" in chunk and "choices" not in chunk:
                            raise self._error_event(chunk)
                        raw_usage = chunk.get("usage")
                        chunk_usage = parse_usage(raw_usage) if raw_usage else None
                        if chunk_usage is not None:
                            usage = chunk_usage
                        elif usage is None:
                            uncounted.append(chunk)
                            if len(uncounted) >= _COUNT_EVERY:
                                out_chars += _chunks_chars(uncounted)
                                uncounted = []
                        last = chunk
                        yield StreamChunk(chunk, chunk_usage, None, None, text)
                        started = True
                    if done or not data:
                        break
                if done:
                    await _drain(resp)
        except MeshError as err:
            raise (as_stream_broken(err) if started else err) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = http.error_for_exception(exc, request.deadline)
            raise (as_stream_broken(error) if started else error) from exc
        if last is None:
            raise UpstreamUnavailable(
                f"{self.name} ended the stream without a chunk", provider=self.name
            )
        if usage is None:
            # the upstream ignored stream_options.include_usage (older vLLM, Ollama): estimate
            usage = Usage(
                prompt_tokens=_prompt_estimate(request),
                completion_tokens=tokens_for_chars(out_chars + _chunks_chars(uncounted)),
                estimated=True,
            )
            yield StreamChunk(_usage_chunk(last, usage), usage=usage)

    # ---- helpers
    def _body(self, request: InferenceRequest) -> Mapping[str, Any]:
        """The client's body without the Anthropic-only fields the door may have put in it
        (OpenAI itself also refuses `top_k`; other compatible servers, vLLM, accept it)."""
        return drop_extensions(request.body, self.name,
                               also=("top_k",) if self.kind == "openai" else ())

    def _parse_text(self, raw: bytes) -> Any:
        """A stream event that orjson refused as bytes: as text, invalid UTF-8 replaced (as an
        SSE client decodes it), else UpstreamUnavailable."""
        try:
            return orjson.loads(raw.decode("utf-8", "replace"))
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable(
                f"{self.name} sent a stream event that is not JSON", provider=self.name
            ) from None

    def _error_event(self, data: Mapping[str, Any]) -> UpstreamUnavailable:
        """An error reported inside a 200 answer or a stream (vLLM, OpenAI mid-stream)."""
        err = data.get("error")
        message = err.get("message") if isinstance(err, dict) else err
        shown = f": {self._http.redact(str(message))}" if message else ""
        return UpstreamUnavailable(f"{self.name} reported an error{shown}", provider=self.name)


def upstream_body(body: Mapping[str, Any], upstream_model: str, *, stream: bool) -> dict[str, Any]:
    """The body to send upstream: a new dict (the client's is shared and never mutated)."""
    if FORBIDDEN_FIELDS.isdisjoint(body):
        out = {**body, "model": upstream_model}
    else:
        out = {k: v for k, v in body.items() if k not in FORBIDDEN_FIELDS}
        out["model"] = upstream_model
    if stream:
        out["stream"] = True
        options = body.get("stream_options")
        out["stream_options"] = (
            {**options, "include_usage": True}
            if isinstance(options, dict)
            else {"include_usage": True}
        )
    else:
        # OpenAI rejects stream_options on a non-stream call
        out.pop("stream_options", None)
        if "stream" in out:
            out["stream"] = False
    return out


def parse_usage(raw: Any) -> Usage | None:
    """OpenAI's usage object as `Usage`, or None when it gives no counts."""
    if not isinstance(raw, dict):
        return None
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    if not isinstance(prompt, int) and not isinstance(completion, int):
        return None
    # (prompt_tokens, completion_tokens) by position: keywords would cost a dict per call
    return Usage(prompt if isinstance(prompt, int) else 0,
                 completion if isinstance(completion, int) else 0)


def _path(kind: RequestKind) -> str:
    try:
        return PATHS[kind]
    except KeyError:
        raise InvalidRequest(f"{kind.value} requests are not supported") from None


def _prompt_estimate(request: InferenceRequest) -> int:
    return request.prompt_tokens_estimate or estimate_prompt_tokens(request.kind, request.body)


def _completion_estimate(data: Mapping[str, Any]) -> int:
    """Estimated completion tokens of a whole answer (0 for embeddings and images)."""
    total = 0
    choices = data.get("choices")
    if not isinstance(choices, list):
        return 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")
        if isinstance(text, str):
            total += estimate_tokens(text)
        message = choice.get("message")
        if isinstance(message, dict):
            total += tokens_for_chars(_message_chars(message))
    return total


def _chunks_chars(chunks: list[dict[str, Any]]) -> int:
    return sum(map(_chunk_chars, chunks))


def _chunk_chars(chunk: Mapping[str, Any]) -> int:
    """Characters of generated text in one stream chunk (for the usage estimate)."""
    choices = chunk.get("choices")
    if not choices:
        return 0
    chars = 0
    for choice in choices:
        text = choice.get("text")
        if isinstance(text, str):
            chars += len(text)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            chars += _message_chars(delta)
    return chars


def _message_chars(message: Mapping[str, Any]) -> int:
    chars = 0
    content = message.get("content")
    if isinstance(content, str):
        chars += len(content)
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for key in ("name", "arguments"):
                    value = function.get(key)
                    if isinstance(value, str):
                        chars += len(value)
    return chars


def _usage_chunk(last: Mapping[str, Any], usage: Usage) -> dict[str, Any]:
    """A usage-only chunk shaped like OpenAI's include_usage chunk."""
    return {
        "id": last.get("id"),
        "object": last.get("object", "chat.completion.chunk"),
        "created": last.get("created"),
        "model": last.get("model"),
        "choices": [],
        "usage": usage.to_openai(),
    }


async def _drain(resp: H1Response) -> None:
    """Read what follows `[DONE]` (normally just the end of the chunked body), briefly."""
    if resp.content.at_eof():
        return
    try:
        async with asyncio.timeout(_DRAIN_AFTER_DONE_S):
            await resp.content.read()
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass  # the connection is dropped instead of reused; the answer is complete
