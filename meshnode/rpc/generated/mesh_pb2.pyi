from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_STATUS_UNSPECIFIED: _ClassVar[MemberStatus]
    ALIVE: _ClassVar[MemberStatus]
    SUSPECT: _ClassVar[MemberStatus]
    DEAD: _ClassVar[MemberStatus]
    LEFT: _ClassVar[MemberStatus]
MEMBER_STATUS_UNSPECIFIED: MemberStatus
ALIVE: MemberStatus
SUSPECT: MemberStatus
DEAD: MemberStatus
LEFT: MemberStatus

class InferRequest(_message.Message):
    __slots__ = ("protocol_version", "request_id", "kind", "model", "body", "stream", "include_usage", "visited", "deadline_ms", "key_name", "headers", "prompt_tokens_estimate", "max_output_tokens", "origin_node", "policy", "caller")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_USAGE_FIELD_NUMBER: _ClassVar[int]
    VISITED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_NODE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    kind: str
    model: str
    body: bytes
    stream: bool
    include_usage: bool
    visited: _containers.RepeatedScalarFieldContainer[str]
    deadline_ms: int
    key_name: str
    headers: _containers.ScalarMap[str, str]
    prompt_tokens_estimate: int
    max_output_tokens: int
    origin_node: str
    policy: PolicyConstraint
    caller: CallerAssertion
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., body: _Optional[bytes] = ..., stream: _Optional[bool] = ..., include_usage: _Optional[bool] = ..., visited: _Optional[_Iterable[str]] = ..., deadline_ms: _Optional[int] = ..., key_name: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., prompt_tokens_estimate: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., origin_node: _Optional[str] = ..., policy: _Optional[_Union[PolicyConstraint, _Mapping]] = ..., caller: _Optional[_Union[CallerAssertion, _Mapping]] = ...) -> None: ...

class CallerAssertion(_message.Message):
    __slots__ = ("key_name", "models_restricted", "models", "reservation_id", "reserved_usd", "entry_node", "callee_node", "request_id", "issued_ms", "mac")
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_RESTRICTED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_USD_FIELD_NUMBER: _ClassVar[int]
    ENTRY_NODE_FIELD_NUMBER: _ClassVar[int]
    CALLEE_NODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_MS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    key_name: str
    models_restricted: bool
    models: _containers.RepeatedScalarFieldContainer[str]
    reservation_id: int
    reserved_usd: float
    entry_node: str
    callee_node: str
    request_id: str
    issued_ms: int
    mac: bytes
    def __init__(self, key_name: _Optional[str] = ..., models_restricted: _Optional[bool] = ..., models: _Optional[_Iterable[str]] = ..., reservation_id: _Optional[int] = ..., reserved_usd: _Optional[float] = ..., entry_node: _Optional[str] = ..., callee_node: _Optional[str] = ..., request_id: _Optional[str] = ..., issued_ms: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

class PolicyConstraint(_message.Message):
    __slots__ = ("name", "restricts_providers", "allow", "max_cost_per_1k")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESTRICTS_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_PER_1K_FIELD_NUMBER: _ClassVar[int]
    name: str
    restricts_providers: bool
    allow: _containers.RepeatedScalarFieldContainer[str]
    max_cost_per_1k: float
    def __init__(self, name: _Optional[str] = ..., restricts_providers: _Optional[bool] = ..., allow: _Optional[_Iterable[str]] = ..., max_cost_per_1k: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "estimated", "cached_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    cached_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., estimated: _Optional[bool] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "usage", "node")
    DATA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    usage: Usage
    node: str
    def __init__(self, data: _Optional[bytes] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., node: _Optional[str] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("usage", "cost", "node", "provider", "model", "latency_ms", "body")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    usage: Usage
    cost: float
    node: str
    provider: str
    model: str
    latency_ms: float
    body: bytes
    def __init__(self, usage: _Optional[_Union[Usage, _Mapping]] = ..., cost: _Optional[float] = ..., node: _Optional[str] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., latency_ms: _Optional[float] = ..., body: _Optional[bytes] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("type", "code", "message", "param", "status", "retryable", "retry_after", "node")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    type: str
    code: str
    message: str
    param: str
    status: int
    retryable: bool
    retry_after: float
    node: str
    def __init__(self, type: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., param: _Optional[str] = ..., status: _Optional[int] = ..., retryable: _Optional[bool] = ..., retry_after: _Optional[float] = ..., node: _Optional[str] = ...) -> None: ...

class InferChunk(_message.Message):
    __slots__ = ("protocol_version", "chunk", "final", "error")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    chunk: Chunk
    final: Final
    error: Error
    def __init__(self, protocol_version: _Optional[int] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class MemberUpdate(_message.Message):
    __slots__ = ("node_id", "address", "incarnation", "status", "from_node")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    incarnation: int
    status: MemberStatus
    from_node: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., incarnation: _Optional[int] = ..., status: _Optional[_Union[MemberStatus, str]] = ..., from_node: _Optional[str] = ...) -> None: ...

class ModelAd(_message.Message):
    __slots__ = ("name", "provider_kind", "kinds", "cost_per_1k_input", "cost_per_1k_output", "max_context_tokens", "max_cost_per_1k_input", "max_cost_per_1k_output")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_KIND_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    COST_PER_1K_INPUT_FIELD_NUMBER: _ClassVar[int]
    COST_PER_1K_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_PER_1K_INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_PER_1K_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider_kind: str
    kinds: _containers.RepeatedScalarFieldContainer[str]
    cost_per_1k_input: float
    cost_per_1k_output: float
    max_context_tokens: int
    max_cost_per_1k_input: float
    max_cost_per_1k_output: float
    def __init__(self, name: _Optional[str] = ..., provider_kind: _Optional[str] = ..., kinds: _Optional[_Iterable[str]] = ..., cost_per_1k_input: _Optional[float] = ..., cost_per_1k_output: _Optional[float] = ..., max_context_tokens: _Optional[int] = ..., max_cost_per_1k_input: _Optional[float] = ..., max_cost_per_1k_output: _Optional[float] = ...) -> None: ...

class CapacityAd(_message.Message):
    __slots__ = ("slots_total", "slots_free", "queue_depth", "tokens_per_s", "prefix_scheme", "prefix_names", "prefill_tokens_per_s", "decode_tokens_per_s")
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SCHEME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_NAMES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    slots_total: int
    slots_free: int
    queue_depth: int
    tokens_per_s: float
    prefix_scheme: int
    prefix_names: bytes
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    def __init__(self, slots_total: _Optional[int] = ..., slots_free: _Optional[int] = ..., queue_depth: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., prefix_scheme: _Optional[int] = ..., prefix_names: _Optional[bytes] = ..., prefill_tokens_per_s: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ...) -> None: ...

class LatencyAd(_message.Message):
    __slots__ = ("model", "ewma_ms", "p95_ms", "ttft_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EWMA_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    ewma_ms: float
    p95_ms: float
    ttft_ms: float
    def __init__(self, model: _Optional[str] = ..., ewma_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ...) -> None: ...

class NodeState(_message.Message):
    __slots__ = ("node_id", "version", "grpc_address", "http_address", "status", "models", "capacity", "latency", "counters", "protocol_version", "blobs", "blob_versions", "elided_blobs")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class BlobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class BlobVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BLOB_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ELIDED_BLOBS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: int
    grpc_address: str
    http_address: str
    status: str
    models: _containers.RepeatedCompositeFieldContainer[ModelAd]
    capacity: CapacityAd
    latency: _containers.RepeatedCompositeFieldContainer[LatencyAd]
    counters: _containers.ScalarMap[str, float]
    protocol_version: int
    blobs: _containers.ScalarMap[str, bytes]
    blob_versions: _containers.ScalarMap[str, int]
    elided_blobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[int] = ..., grpc_address: _Optional[str] = ..., http_address: _Optional[str] = ..., status: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelAd, _Mapping]]] = ..., capacity: _Optional[_Union[CapacityAd, _Mapping]] = ..., latency: _Optional[_Iterable[_Union[LatencyAd, _Mapping]]] = ..., counters: _Optional[_Mapping[str, float]] = ..., protocol_version: _Optional[int] = ..., blobs: _Optional[_Mapping[str, bytes]] = ..., blob_versions: _Optional[_Mapping[str, int]] = ..., elided_blobs: _Optional[_Iterable[str]] = ...) -> None: ...

class DigestEntry(_message.Message):
    __slots__ = ("node_id", "incarnation", "status", "state_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    status: MemberStatus
    state_version: int
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., status: _Optional[_Union[MemberStatus, str]] = ..., state_version: _Optional[int] = ...) -> None: ...

class GossipRecord(_message.Message):
    __slots__ = ("member", "state")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    member: MemberUpdate
    state: NodeState
    def __init__(self, member: _Optional[_Union[MemberUpdate, _Mapping]] = ..., state: _Optional[_Union[NodeState, _Mapping]] = ...) -> None: ...

class GossipRequest(_message.Message):
    __slots__ = ("protocol_version", "from_node", "digest", "records", "join")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    from_node: str
    digest: _containers.RepeatedCompositeFieldContainer[DigestEntry]
    records: _containers.RepeatedCompositeFieldContainer[GossipRecord]
    join: bool
    def __init__(self, protocol_version: _Optional[int] = ..., from_node: _Optional[str] = ..., digest: _Optional[_Iterable[_Union[DigestEntry, _Mapping]]] = ..., records: _Optional[_Iterable[_Union[GossipRecord, _Mapping]]] = ..., join: _Optional[bool] = ...) -> None: ...

class GossipResponse(_message.Message):
    __slots__ = ("protocol_version", "from_node", "records", "wants", "want_versions")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    WANTS_FIELD_NUMBER: _ClassVar[int]
    WANT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    from_node: str
    records: _containers.RepeatedCompositeFieldContainer[GossipRecord]
    wants: _containers.RepeatedScalarFieldContainer[str]
    want_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, protocol_version: _Optional[int] = ..., from_node: _Optional[str] = ..., records: _Optional[_Iterable[_Union[GossipRecord, _Mapping]]] = ..., wants: _Optional[_Iterable[str]] = ..., want_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("protocol_version", "from_node", "seq", "target_node", "target_address", "timeout_ms", "about_you")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ABOUT_YOU_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    from_node: str
    seq: int
    target_node: str
    target_address: str
    timeout_ms: int
    about_you: MemberUpdate
    def __init__(self, protocol_version: _Optional[int] = ..., from_node: _Optional[str] = ..., seq: _Optional[int] = ..., target_node: _Optional[str] = ..., target_address: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., about_you: _Optional[_Union[MemberUpdate, _Mapping]] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("protocol_version", "node_id", "seq", "ok", "incarnation")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    seq: int
    ok: bool
    incarnation: int
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., seq: _Optional[int] = ..., ok: _Optional[bool] = ..., incarnation: _Optional[int] = ...) -> None: ...
