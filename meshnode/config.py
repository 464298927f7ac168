"""The typed configuration tree: load, expand, validate once.

This module is the only reader of config files and of the environment for settings. Everything
else receives its own frozen slice (`Router(config.routing, ...)`). Validation collects every
problem and reports each as `path: message`, e.g.
`providers.openai.models[0].cost_per_1k_tokens: must be >= 0`.

Precedence: command-line flags > the file > the embedded default. With no file at all, the
embedded default serves the built-in local models and every cloud provider whose key is in the
environment (SPEC §2).
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meshnode.errors import ConfigError

STRATEGIES = ("cost_optimized", "latency_optimized", "availability", "round_robin", "least_loaded")
PROVIDER_TYPES = ("openai", "openai_compatible", "anthropic", "cloudflare", "local", "together")

# Named presets: a provider type that is another type with defaults filled in.
PRESETS: dict[str, dict[str, Any]] = {
    "together": {
        "type": "openai_compatible",
        "base_url": "https://api.together.xyz/v1",
        "api_key_env": "TOGETHER_API_KEY",
    },
}
DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "cloudflare": "https://api.cloudflare.com/client/v4",
    "together": "https://api.together.xyz/v1",
}
# The field that names the upstream model, per provider type.
UPSTREAM_FIELD = {
    "openai": "openai_model",
    "openai_compatible": "openai_model",
    "together": "openai_model",
    "anthropic": "anthropic_model",
    "cloudflare": "cloudflare_model",
}
MODEL_KINDS = ("chat", "completion", "embedding", "image")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- node / server
class NodeConfig(_Strict):
    id: str | None = None
    data_dir: Path = Path("./.meshnode")


class CorsConfig(_Strict):
    """Browser access (CORS). No origins: no CORS headers at all, as before."""

    allow_origins: list[str] = Field(default_factory=list)  # exact origins, or ["*"]
    allow_credentials: bool = False  # never honoured with "*" (browsers refuse it anyway)
    max_age_s: int = Field(default=600, ge=0)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and (
                "://" not in origin or origin.endswith("/") or origin != origin.strip()
            ):
                raise ValueError(
                    f"{origin!r} is not an origin (scheme://host[:port], no path, or '*')"
                )
        return value

    @model_validator(mode="after")
    def _no_credentials_with_any(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_credentials cannot be used with allow_origins '*' "
                             "(list the origins that may send credentials)")
        return self


class ResponsesStoreConfig(_Strict):
    """Responses API `store: true`: kept in data_dir/responses.sqlite3."""

    max_entries: int = Field(default=10_000, ge=1)
    max_age_s: float = Field(default=30 * 24 * 3600.0, gt=0)


class ServerConfig(_Strict):
    listen_addr: str = "127.0.0.1:8080"
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    responses_store: ResponsesStoreConfig = Field(default_factory=ResponsesStoreConfig)
    # Limits against clients that hold connections without sending (meshnode/api/server.py).
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    idle_timeout_s: float = Field(default=60.0, gt=0)
    max_connections: int = Field(default=1024, gt=0)
    reserved_connections: int = Field(default=16, ge=0)


class LoggingConfig(_Strict):
    format: Literal["json", "text"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


# --------------------------------------------------------------------------- mesh
class TLSConfig(_Strict):
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class MeshConfig(_Strict):
    enabled: bool = True
    listen_addr: str = "127.0.0.1:50051"
    advertise_addr: str | None = None
    seeds: list[str] = Field(default_factory=list)
    mdns: bool = True
    mdns_interfaces: list[str] = Field(default_factory=list)
    gossip_interval_ms: int = Field(default=500, gt=0)
    # SWIM timing, sized for SPEC §6 (a killed node known dead by all within 5 s, <= 10 nodes):
    # first probe <= ~2 s, suspicion 4 * max(1, log10 n) * 0.5 s = 2 s, then an urgent broadcast.
    probe_interval_ms: int = Field(default=500, gt=0)
    probe_timeout_ms: int = Field(default=400, gt=0)
    indirect_probes: int = Field(default=3, ge=0)
    suspicion_mult: float = Field(default=4.0, gt=0)
    dead_forget_s: float = Field(default=60.0, gt=0)
    secret: str | None = None
    tls: TLSConfig = Field(default_factory=TLSConfig)
    max_hops: int = Field(default=2, ge=0, le=16)
    insecure: bool = False

    @property
    def advertise(self) -> str:
        return self.advertise_addr or self.listen_addr


# --------------------------------------------------------------------------- providers
class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["chat", "completion", "embedding", "image"] = "chat"
    path: Path | None = None
    builtin: str | None = None
    openai_model: str | None = None
    anthropic_model: str | None = None
    cloudflare_model: str | None = None
    cost_per_1k_tokens: float | None = Field(default=None, ge=0)
    cost_per_1k_input: float | None = Field(default=None, ge=0)
    cost_per_1k_output: float | None = Field(default=None, ge=0)
    max_context_tokens: int | None = Field(default=None, gt=0)
    # local embedding models trained so a prefix of the vector is an embedding too: then
    # `dimensions` is honoured (cut and renormalised) instead of refused.
    matryoshka: bool = False

    @property
    def input_price(self) -> float:
        if self.cost_per_1k_input is not None:
            return self.cost_per_1k_input
        return self.cost_per_1k_tokens or 0.0

    @property
    def output_price(self) -> float:
        if self.cost_per_1k_output is not None:
            return self.cost_per_1k_output
        return self.cost_per_1k_tokens or 0.0


class ProviderConfig(_Strict):
    type: str | None = None
    enabled: bool = True
    priority: int = 100
    base_url: str | None = None
    credentials: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    models: list[ModelConfig] = Field(default_factory=list)
    max_concurrency: int = Field(default=256, gt=0)
    # local provider only
    device: str = "auto"
    max_batch: int = Field(default=16, gt=0)
    max_queue: int = Field(default=64, ge=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_len: int = Field(default=0, ge=0)
    prefill_chunk: int = Field(default=256, gt=0)
    prefix_cache_mb: int = Field(default=-1, ge=-1)
    cuda_graphs: bool = True


class ResolvedProvider(_Strict):
    """A provider config with its name, its effective type and defaults filled in."""

    name: str
    type: Literal["openai", "openai_compatible", "anthropic", "cloudflare", "local"]
    preset: str | None = None
    config: ProviderConfig
    base_url: str | None = None


# --------------------------------------------------------------------------- routing
class BackoffConfig(_Strict):
    initial_ms: float = Field(default=100, ge=0)
    max_ms: float = Field(default=2000, ge=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)


class CooldownConfig(_Strict):
    failures: int = Field(default=3, ge=1)  # consecutive failures that cool a candidate down
    seconds: float = Field(default=30.0, gt=0)  # first cooldown; doubles while probes fail
    max_seconds: float = Field(default=300.0, gt=0)
    max_retry_after_s: float = Field(default=60.0, gt=0)  # cap on an upstream's Retry-After


class FailoverConfig(_Strict):
    enabled: bool = True
    fallback_chain: list[str] | None = None
    max_retries: int = Field(default=3, ge=0, le=20)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    cooldown: CooldownConfig = Field(default_factory=CooldownConfig)


class TimeoutsConfig(_Strict):
    connect_ms: float = Field(default=2000, gt=0)
    first_byte_ms: float = Field(default=30000, gt=0)
    total_ms: float = Field(default=120000, gt=0)


class PolicyMatch(_Strict):
    header: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    key: str | None = None
    min_prompt_tokens: int | None = Field(default=None, ge=0)


class PolicyConfig(_Strict):
    name: str = Field(min_length=1)
    match: PolicyMatch = Field(default_factory=PolicyMatch)
    allow: list[str] | None = None
    strategy: Literal[
        "cost_optimized", "latency_optimized", "availability", "round_robin", "least_loaded",
        "cache_aware",
    ] | None = None
    max_cost_per_1k: float | None = Field(default=None, ge=0)
    deadline_ms: float | None = Field(default=None, gt=0)


class RoutingConfig(_Strict):
    strategy: Literal[
        "cost_optimized", "latency_optimized", "availability", "round_robin", "least_loaded",
        "cache_aware",
    ] = "cost_optimized"
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    policies: list[PolicyConfig] = Field(default_factory=list)
    # The local worker overflows to the next candidate when its queue is over this bound.
    overflow_queue_depth: int = Field(default=32, ge=0)


# --------------------------------------------------------------------------- cache, budget, auth
class SemanticCacheConfig(_Strict):
    enabled: bool = False
    model: str = "minilm"
    threshold: float = Field(default=0.92, ge=0.0, le=1.0)
    models: list[str] = Field(default_factory=list)


class CacheConfig(_Strict):
    enabled: bool = True
    max_entries: int = Field(default=10000, ge=0)
    ttl_s: float = Field(default=3600, ge=0)
    persist: bool = False
    semantic: SemanticCacheConfig = Field(default_factory=SemanticCacheConfig)


class BudgetConfig(_Strict):
    enabled: bool = True
    daily_limit: float | None = Field(default=None, ge=0)
    monthly_limit: float | None = Field(default=None, ge=0)
    scope: Literal["node", "mesh"] = "mesh"
    # What a call reserves when its worst case cannot be bounded (no max_tokens and a model of
    # unknown maximum context), in USD.
    max_reservation: float = Field(default=1.0, gt=0)


class KeyConfig(_Strict):
    name: str = Field(min_length=1)
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    daily_limit: float | None = Field(default=None, ge=0)
    monthly_limit: float | None = Field(default=None, ge=0)
    models: list[str] | None = None
    admin: bool = False


class AuthConfig(_Strict):
    enabled: bool = False
    keys: list[KeyConfig] = Field(default_factory=list)


# --------------------------------------------------------------------------- the whole tree
class Config(_Strict):
    node: NodeConfig = Field(default_factory=NodeConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        errors: list[str] = []
        for name, provider in self.providers.items():
            errors.extend(_check_provider(name, provider))
        errors.extend(
            _name_errors(
                {n: p.type for n, p in self.providers.items()},
                self.routing.failover.fallback_chain or [],
                [p.allow or [] for p in self.routing.policies],
            )
        )
        for addr_path, addr in (
            ("server.listen_addr", self.server.listen_addr),
            ("mesh.listen_addr", self.mesh.listen_addr),
        ):
            problem = _check_addr(addr)
            if problem:
                errors.append(f"{addr_path}: {problem}")
        if self.server.reserved_connections >= self.server.max_connections:
            errors.append(
                "server.reserved_connections: must be less than server.max_connections "
                f"({self.server.max_connections})"
            )
        for i, seed in enumerate(self.mesh.seeds):
            problem = _check_addr(seed)
            if problem:
                errors.append(f"mesh.seeds[{i}]: {problem}")
        seen_keys: set[str] = set()
        for i, key in enumerate(self.auth.keys):
            if key.name in seen_keys:
                errors.append(f"auth.keys[{i}].name: {key.name!r} is listed twice")
            seen_keys.add(key.name)
        if self.mesh.tls.enabled and not (self.mesh.tls.key_file and self.mesh.tls.ca_file):
            errors.append("mesh.tls: cert_file, key_file and ca_file must be set together")
        if errors:
            raise _CrossCheckError(errors)
        return self

    def resolved_providers(self) -> list[ResolvedProvider]:
        """Enabled providers with effective type and base URL, in priority order."""
        out = []
        for name, provider in self.providers.items():
            if not provider.enabled:
                continue
            declared = provider.type or name
            preset = PRESETS.get(declared)
            base_url = provider.base_url or DEFAULT_BASE_URLS.get(declared)
            out.append(
                ResolvedProvider.model_validate(
                    dict(
                        name=name,
                        type=_effective_type(name, provider),
                        preset=declared if preset else None,
                        config=provider,
                        base_url=base_url,
                    )
                )
            )
        out.sort(key=lambda r: (r.config.priority, r.name))
        return out

    def fallback_chain(self) -> list[str]:
        """The configured chain, or every enabled provider by priority and then the mesh."""
        if self.routing.failover.fallback_chain:
            return list(self.routing.failover.fallback_chain)
        return [r.name for r in self.resolved_providers()] + ["mesh"]


def _name_errors(
    providers: Mapping[str, str | None],
    chain: Sequence[Any],
    policy_allows: Sequence[Sequence[Any]],
) -> list[str]:
    """Names in the fallback chain and in policies that match no provider. `providers` maps
    each provider's name to its declared `type` (or None)."""
    errors: list[str] = []
    known = set(providers) | {"mesh"}
    for name, declared in providers.items():
        declared = declared or name
        preset = PRESETS.get(declared)
        known.add(str(preset["type"]) if preset else declared)
        known.add(declared)
    for i, entry in enumerate(chain):
        if entry not in known:
            errors.append(
                f"routing.failover.fallback_chain[{i}]: no provider named {entry!r} "
                f"(configured: {', '.join(sorted(providers)) or 'none'}, and 'mesh')"
            )
    # A policy may name any provider kind, configured here or not: it also constrains what
    # peers do with a forwarded request ("[local, mesh]" on a node without local models).
    allowable = known | set(PROVIDER_TYPES)
    for i, allow in enumerate(policy_allows):
        for j, entry in enumerate(allow):
            if entry not in allowable:
                errors.append(
                    f"routing.policies[{i}].allow[{j}]: no provider or kind named {entry!r}"
                )
    return errors


def _raw_name_errors(doc: Mapping[str, Any]) -> list[str]:
    """`_name_errors` over a document that failed field validation (the model's own cross
    checks did not run), read defensively, so one pass lists these errors too."""

    def mapping(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    def strings(value: Any) -> list[Any]:
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    providers = {
        str(name): (p.get("type") if isinstance(p.get("type"), str) else None)
        for name, p in mapping(doc.get("providers")).items()
        if isinstance(p, Mapping)
    }
    routing = mapping(doc.get("routing"))
    chain = strings(mapping(routing.get("failover")).get("fallback_chain"))
    policies = routing.get("policies")
    allows = [
        strings(p.get("allow")) for p in (policies if isinstance(policies, list) else [])
        if isinstance(p, Mapping)
    ]
    return _name_errors(providers, chain, allows)


class _CrossCheckError(ValueError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _effective_type(name: str, provider: ProviderConfig) -> str:
    declared = provider.type or name
    preset = PRESETS.get(declared)
    return str(preset["type"]) if preset else declared


def _check_provider(name: str, provider: ProviderConfig) -> list[str]:
    errors: list[str] = []
    declared = provider.type or name
    where = f"providers.{name}"
    if declared not in PROVIDER_TYPES:
        errors.append(
            f"{where}.type: unknown provider type {declared!r} "
            f"(one of {', '.join(PROVIDER_TYPES)}); name the provider after its type "
            "or set `type`"
        )
        return errors
    eff = _effective_type(name, provider)
    if eff == "openai_compatible" and not (provider.base_url or declared in DEFAULT_BASE_URLS):
        errors.append(f"{where}.base_url: required for an openai_compatible provider")
    if provider.base_url is not None and not re.match(r"^https?://", provider.base_url):
        errors.append(f"{where}.base_url: must start with http:// or https://")
    if provider.enabled and not provider.models and eff != "local":
        errors.append(f"{where}.models: an enabled provider must offer at least one model")
    upstream_field = UPSTREAM_FIELD.get(declared)
    for i, model in enumerate(provider.models):
        mwhere = f"{where}.models[{i}]"
        for other in ("openai_model", "anthropic_model", "cloudflare_model"):
            if getattr(model, other) is not None and other != upstream_field:
                article = "an" if declared[0] in "aeiou" else "a"
                errors.append(f"{mwhere}.{other}: not valid for {article} {declared} provider")
        if model.cost_per_1k_tokens is not None and (
            model.cost_per_1k_input is not None or model.cost_per_1k_output is not None
        ):
            errors.append(
                f"{mwhere}: give cost_per_1k_tokens, or cost_per_1k_input and "
                "cost_per_1k_output, not both"
            )
        if any(m.name == model.name for m in provider.models[:i]):
            errors.append(f"{mwhere}.name: {model.name!r} is listed twice in this provider")
        if eff == "local":
            if model.path is None and model.builtin is None:
                errors.append(f"{mwhere}: a local model needs `path` or `builtin`")
            if model.path is not None and model.builtin is not None:
                errors.append(f"{mwhere}: give `path` or `builtin`, not both")
            if model.matryoshka and model.kind != "embedding":
                errors.append(f"{mwhere}.matryoshka: only for embedding models")
        elif model.path is not None or model.builtin is not None:
            errors.append(f"{mwhere}: `path` and `builtin` are for local models only")
        elif model.matryoshka:
            errors.append(f"{mwhere}.matryoshka: for local models only (a cloud upstream "
                          "gets `dimensions` as the client sent it)")
    return errors


def _check_addr(addr: str) -> str | None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        return f"{addr!r} must be HOST:PORT"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"{addr!r} has an invalid port"
    return None


# --------------------------------------------------------------------------- loading
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand_env(
    value: Any, env: Mapping[str, str], unset: list[str] | None = None, where: str = ""
) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string of a parsed document. A `${VAR}`
    with no default whose variable is unset or empty becomes "" and, when `unset` is given, is
    added to it as `path: ${VAR}` (so the caller can name it)."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            found = env.get(m.group(1))
            if found:
                return found
            if m.group(2) is None and unset is not None:
                unset.append(f"{where or '(top)'}: ${{{m.group(1)}}}")
            return m.group(2) or ""

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand_env(v, env, unset, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: expand_env(v, env, unset, f"{where}.{k}" if where else str(k))
                for k, v in value.items()}
    return value


def read_document(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON file into a dict; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(text)
        else:
            doc = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: not valid {_syntax_name(path)} ({_one_line(exc)})"]) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    return doc


def _syntax_name(path: Path) -> str:
    return "JSON" if path.suffix.lower() == ".json" else "YAML"


def _one_line(exc: Exception) -> str:
    """A parser's complaint on one line, with the place in the file (errors are listed one per
    line)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{where}: {problem}" if problem else where
    return " ".join(str(exc).split())


def embedded_default(env: Mapping[str, str]) -> dict[str, Any]:
    """The config `meshnode run` uses with no file: built-in local models, plus each cloud
    provider whose key is in the environment."""
    providers: dict[str, Any] = {
        "local": {
            "priority": 1,
            "device": "auto",
            "models": [
                {"name": "minilm", "builtin": "minilm", "kind": "embedding"},
                {"name": "smollm2", "builtin": "smollm2", "kind": "chat"},
            ],
        }
    }
    if env.get("CLOUDFLARE_ACCOUNT_ID") and env.get("CLOUDFLARE_API_TOKEN"):
        providers["cloudflare"] = {
            "priority": 2,
            "credentials": {
                "account_id": env["CLOUDFLARE_ACCOUNT_ID"],
                "api_token": env["CLOUDFLARE_API_TOKEN"],
            },
            "models": [
                {"name": "llama-3.1-8b", "cloudflare_model": "@cf/meta/llama-3.1-8b-instruct",
                 "cost_per_1k_tokens": 0.001},
                {"name": "bge-base-en", "cloudflare_model": "@cf/baai/bge-base-en-v1.5",
                 "kind": "embedding", "cost_per_1k_tokens": 0.0001},
                {"name": "sdxl", "cloudflare_model": "@cf/stabilityai/stable-diffusion-xl-base-1.0",
                 "kind": "image"},
            ],
        }
    if env.get("OPENAI_API_KEY"):
        providers["openai"] = {
            "priority": 3,
            "credentials": {"api_key": env["OPENAI_API_KEY"]},
            "models": [
                {"name": "gpt-4o", "openai_model": "gpt-4o",
                 "cost_per_1k_input": 0.0025, "cost_per_1k_output": 0.01},
                {"name": "gpt-4o-mini", "openai_model": "gpt-4o-mini",
                 "cost_per_1k_input": 0.00015, "cost_per_1k_output": 0.0006},
                {"name": "text-embedding-3-small", "openai_model": "text-embedding-3-small",
                 "kind": "embedding", "cost_per_1k_tokens": 0.00002},
            ],
        }
    if env.get("ANTHROPIC_API_KEY"):
        providers["anthropic"] = {
            "priority": 4,
            "credentials": {"api_key": env["ANTHROPIC_API_KEY"]},
            "models": [
                {"name": "claude-sonnet-4", "anthropic_model": "claude-sonnet-4-20250514",
                 "cost_per_1k_input": 0.003, "cost_per_1k_output": 0.015},
                {"name": "claude-3-5-haiku", "anthropic_model": "claude-3-5-haiku-latest",
                 "cost_per_1k_input": 0.0008, "cost_per_1k_output": 0.004},
            ],
        }
    if env.get("TOGETHER_API_KEY"):
        providers["together"] = {
            "priority": 5,
            "credentials": {"api_key": env["TOGETHER_API_KEY"]},
            "models": [
                {"name": "llama-3.1-8b", "openai_model": "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
                 "cost_per_1k_tokens": 0.00018},
            ],
        }
    return {"providers": providers}


def _fill_preset_credentials(doc: dict[str, Any], env: Mapping[str, str]) -> None:
    """A preset provider (`together`) with no api_key takes it from its usual variable."""
    providers = doc.get("providers")
    if not isinstance(providers, dict):
        return
    for name, provider in providers.items():
        if not isinstance(provider, dict):
            continue
        preset = PRESETS.get(str(provider.get("type") or name))
        if preset is None:
            continue
        creds = provider.get("credentials")
        if creds is None:
            creds = provider["credentials"] = {}
        if isinstance(creds, dict) and not creds.get("api_key") and env.get(preset["api_key_env"]):
            creds["api_key"] = env[preset["api_key_env"]]


def _set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = doc
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def load_config(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    unset: list[str] | None = None,
) -> Config:
    """Load, expand and validate. Raises ConfigError listing every problem as `path: message`.

    `overrides` maps dotted paths (`server.listen_addr`) to values from command-line flags.
    `unset`, when given, receives `path: ${VAR}` for every variable the file names without a
    default that is not set (it expanded to ""), for the caller to report.
    """
    env = os.environ if env is None else env
    doc = read_document(Path(path)) if path is not None else embedded_default(env)
    doc = expand_env(doc, env, unset if path is not None else None)
    _fill_preset_credentials(doc, env)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(doc, dotted, value)
    return validate(doc)


def validate(doc: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(doc)
    except ValidationError as exc:
        errors = _format_errors(exc)
        # Field errors stop pydantic before the model's cross checks: run the name checks on
        # the raw document so a single pass still lists every error.
        errors.extend(e for e in _raw_name_errors(doc) if e not in errors)
        raise ConfigError(errors) from None


def _format_errors(exc: ValidationError) -> list[str]:
    out: list[str] = []
    for err in exc.errors():
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _CrossCheckError):
            out.extend(ctx_error.errors)
            continue
        loc = _format_loc(err["loc"])
        out.append(f"{loc}: {_message(err)}" if loc else _message(err))
    return out


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _message(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "greater_than_equal":
        return f"must be >= {_num(ctx.get('ge'))}"
    if kind == "greater_than":
        return f"must be > {_num(ctx.get('gt'))}"
    if kind == "less_than_equal":
        return f"must be <= {_num(ctx.get('le'))}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {err.get('input')!r})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch" and err["loc"] and err["loc"][-1] == "key_sha256":
        return "must be the key's SHA-256 as 64 hex characters (e.g. `printf %s KEY | sha256sum`)"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{err['msg'].lower()} (got {type(err.get('input')).__name__})"
    return str(err["msg"])


# --------------------------------------------------------------------------- identity
def node_id(config: Config) -> str:
    """The node's id: from config, else persisted in data_dir, else hostname + random suffix
    (and persisted)."""
    if config.node.id:
        return config.node.id
    data_dir = config.node.data_dir
    id_file = data_dir / "node_id"
    try:
        existing = id_file.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    except OSError:
        pass
    new_id = f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = id_file.with_suffix(".tmp")
    tmp.write_text(new_id + "\n", encoding="utf-8")
    tmp.replace(id_file)
    return new_id
