"""Domain types shared by every layer: requests, answers, offers, usage, capacity.

Wire types (OpenAI JSON, protobuf) stay at the edges (`api/`, `rpc/`, adapters). What crosses a
layer boundary is one of these. They hold no behaviour beyond small derived values.

A note on `body`: an `InferenceRequest` carries the client's OpenAI JSON body, already validated
by `api.protocol`. It is shared, never mutated: an adapter that needs another shape builds a new
dict (`{**request.body, "model": offer.upstream_model}`). Keeping the parsed body avoids a second
parse and a second serialisation on the hot path.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NewType, TypeVar, dataclass_transform

if TYPE_CHECKING:
    from meshnode.routing.prefix import RequestPrefix

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def frozen_record(cls: type[_T]) -> type[_T]:
    """A frozen dataclass (slots) to the type checker, for a value built on every request: at
    run time its `__init__` stores fields plainly. A frozen dataclass's `__init__` stores each
    field through `object.__setattr__`, ~1,200 instructions a field (an `InferenceRequest`:
    ~20,000). Equality, hash (by fields, as frozen), repr and `dataclasses.replace` are the
    frozen ones; only a write that the type checker already refuses would not raise."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


# Fields of an OpenAI body that would redirect traffic or swap credentials (LiteLLM-style
# per-request overrides), or that are routing knobs of other proxies. Never honoured: the front
# end strips them from what clients send, and every adapter strips them again from what it
# sends upstream (a peer's forwarded body does not pass the front end).
REDIRECT_FIELDS: frozenset[str] = frozenset(
    {
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "api_type",
        "organization",
        "project",
        "extra_headers",
        "extra_query",
        "headers",
        "custom_llm_provider",
        "deployment_id",
        "azure_ad_token",
        "azure_endpoint",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_region_name",
        "vertex_credentials",
        "vertex_project",
        "vertex_location",
        "litellm_params",
        "proxy",
        "extra_body",
        "default_headers",
        "x_aiproxy",
        "x_responses_native",  # set only by meshnode's /v1/responses (RESPONSES_NATIVE_FIELD)
    }
)
# A /v1/responses request rides as a chat request (every provider serves chat); this field of
# its chat body holds the Responses body itself, for a provider that speaks the Responses API
# natively (OpenAI) to send as it is. Clients cannot set it (a redirect field: stripped).
RESPONSES_NATIVE_FIELD = "x_responses_native"

NodeId = NewType("NodeId", str)
ModelId = NewType("ModelId", str)
ProviderName = NewType("ProviderName", str)


class RequestKind(enum.StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    IMAGE = "image"


@frozen_record
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # True when a count was estimated because the upstream gave none.
    estimated: bool = False
    # Prompt tokens served from a prefix cache (OpenAI's prompt_tokens_details.cached_tokens).
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out


@dataclass(frozen=True, slots=True)
class ModelOffer:
    """One provider's offer of one model: what routing chooses between."""

    model: str  # the public name clients ask for
    provider: str  # the provider's name (its config key), e.g. "openai", "together", "local"
    provider_kind: str  # openai | openai_compatible | anthropic | cloudflare | local | mesh
    upstream_model: str  # what the provider calls it
    kinds: frozenset[RequestKind] = frozenset({RequestKind.CHAT, RequestKind.COMPLETION})
    cost_per_1k_input: float = 0.0
    cost_per_1k_output: float = 0.0
    priority: int = 100
    max_context_tokens: int | None = None
    node: str | None = None  # the serving node for mesh offers; None for this node
    # A peer's offer: its dearest price for the model (what it could fail over to), which the
    # caller reserves against; None: the price above is the only one.
    worst_cost_per_1k_input: float | None = None
    worst_cost_per_1k_output: float | None = None

    @property
    def worst_input(self) -> float:
        w = self.worst_cost_per_1k_input
        return self.cost_per_1k_input if w is None else max(w, self.cost_per_1k_input)

    @property
    def worst_output(self) -> float:
        w = self.worst_cost_per_1k_output
        return self.cost_per_1k_output if w is None else max(w, self.cost_per_1k_output)

    def cost(self, usage: Usage) -> float:
        return (
            usage.prompt_tokens * self.cost_per_1k_input
            + usage.completion_tokens * self.cost_per_1k_output
        ) / 1000.0

    @property
    def key(self) -> tuple[str, str]:
        """Identity for per-candidate stats and cooldowns."""
        return (self.provider if self.node is None else f"{self.provider}:{self.node}", self.model)


@frozen_record
class PolicyConstraint:
    """A routing policy's constraints as they travel with a forwarded request (the origin's
    matched rule, merged with any it received): `allow` None means unrestricted providers."""

    name: str
    allow: tuple[str, ...] | None = None
    max_cost_per_1k: float | None = None


@frozen_record
class Caller:
    """Whom a forwarded request is for, as its entry node asserted it and this node verified it
    (docs/security.md): the key (None: anonymous), the key's model scope there (None: every
    model), and what the entry node reserved for the call (None: it has no budget, so no cap)."""

    key_name: str | None
    models: tuple[str, ...] | None
    entry_node: str
    reservation_id: int = 0
    reserved_usd: float | None = None


@frozen_record
class BudgetHeld:
    """The budget the entry node holds for one attempt at a peer (travels in the assertion)."""

    reservation_id: int
    amount: float


@frozen_record
class InferenceRequest:
    kind: RequestKind
    model: str
    body: dict[str, Any]  # the validated OpenAI JSON body; never mutated
    request_id: str
    deadline: float  # time.monotonic() value after which the request is abandoned
    stream: bool = False
    include_usage: bool = False
    key_name: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased x-aiproxy-* headers
    visited: tuple[str, ...] = ()  # node ids already on the path (mesh forwarding)
    prompt_tokens_estimate: int = 0
    max_output_tokens: int | None = None
    policy: PolicyConstraint | None = None  # constraints from the origin's policy (forwarded)
    # Serving side: the verified caller of a forwarded request (None: not forwarded, or nobody
    # vouched for it). Entry side: set by the router for an attempt at a peer.
    caller: Caller | None = None
    held: BudgetHeld | None = None
    # Set by the router for an attempt at a local provider when its ranking already named the
    # prompt (cache_aware): the worker ties these names to its KV, so they are made once.
    prefix: RequestPrefix | None = None


@dataclass(slots=True)
class Completion:
    """A whole (non-stream) answer from a provider, OpenAI-shaped, without `x_aiproxy`."""

    body: dict[str, Any]
    usage: Usage
    node: str | None = None  # who served it, when it was a peer
    cost: float | None = None  # what the peer charged (Final.cost); None: price it here


@dataclass(slots=True)
class StreamChunk:
    """One OpenAI stream chunk (`chat.completion.chunk` or `text_completion`).

    `usage` is set on the chunk that reports the final token counts (OpenAI's
    `stream_options.include_usage` chunk, or a translated equivalent). Adapters always ask their
    upstream for usage; the API layer strips it when the client did not ask.
    """

    data: dict[str, Any]
    usage: Usage | None = None
    node: str | None = None
    # Set only on a peer stream's trailer (empty `data`, never relayed): what the peer charged.
    reported_cost: float | None = None
    # The JSON text `data` was parsed from, when an adapter has it as it came (one line, valid
    # UTF-8): the SSE encoder relays these bytes instead of serializing `data` again. Whoever
    # wants a changed chunk builds a new one (`data` is never mutated; `raw` would be stale).
    raw: bytes | None = None


def mean_rate(rates: Iterable[float]) -> float:
    """The mean of the measured rates among `rates` (0.0 stands for not measured and counts
    for nothing): how one figure speaks for several engines, workers or providers."""
    measured = [r for r in rates if r > 0]
    return sum(measured) / len(measured) if measured else 0.0


@frozen_record
class Capacity:
    """What a provider can take now; feeds `least_loaded` and gossip."""

    slots_total: int = 0
    slots_free: int = 0
    queue_depth: int = 0
    tokens_per_s: float = 0.0
    memory_used_bytes: int = 0
    # Names of the prompt-prefix KV blocks a local worker holds (meshnode.worker.prefix: hex
    # chain hashes, most recent first): what prefix-aware routing can prefer.
    prefix_blocks: tuple[str, ...] = ()
    # Routing prefix names (meshnode/routing/prefix.py) whose KV the serving engine holds: a
    # peer's gossiped ones, or what a local worker reports. What `cache_aware` matches a
    # request's chain against.
    prefix_names: frozenset[bytes] = frozenset()
    # The same names most recent first, from a provider that knows what its engine holds (the
    # local worker: it drops a name when its engine evicts the blocks); None when it cannot tell
    # (the router then records what the provider served).
    prefix_recent: tuple[bytes, ...] | None = None
    # The serving engine's measured prefill tokens/s and decode tokens/s per stream
    # (meshnode.worker.rates; 0.0: not measured): how much of a request's service a prefix hit
    # saves there (`cache_aware`).
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0

    @property
    def load(self) -> float:
        """0.0 idle .. 1.0 full, > 1.0 queueing."""
        if self.slots_total <= 0:
            return 0.0
        busy = self.slots_total - self.slots_free + self.queue_depth
        return busy / self.slots_total
