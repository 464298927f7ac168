"""The configuration reference (docs/config-reference.md), generated from the config models.

    python -m meshnode.config_doc --write     # regenerate docs/config-reference.md
    python -m meshnode.config_doc --check     # exit 1 if the committed file is stale

Types, defaults and bounds come from the pydantic models in `meshnode.config` (walked from
`Config`); the one-line meanings come from `DESCRIPTIONS` below, keyed by dotted path. A model
field without a description, or a description for a field that no longer exists, is an error
(`missing_descriptions()`, checked by tests/unit/test_config_doc.py with the staleness check),
so the reference cannot fall behind the code. This module reads the models only; it never
loads a config or touches the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from meshnode.config import Config, embedded_default

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"

# Dotted paths: `providers.*` is any provider name, `[]` an item of a list.
DESCRIPTIONS: dict[str, str] = {
    "node": "This node's identity and state directory.",
    "node.id": "Node id; default: hostname + a short random suffix, persisted in `data_dir/node_id`.",
    "node.data_dir": "Budget ledger, keys, node id, persisted cache. One node process per directory.",
    "server": "The OpenAI-compatible HTTP API.",
    "server.listen_addr": "HTTP `HOST:PORT`; port 0 picks a free one (printed as `MESHNODE_HTTP=`).",
    "server.max_body_bytes": "Larger request bodies get 413.",
    "server.shutdown_grace_s": "On SIGTERM/SIGINT, how long in-flight requests may drain.",
    "server.cors": "Browser access to the API (CORS); docs/configuration.md: CORS.",
    "server.cors.allow_origins": "Origins (`https://app.example.com`) allowed to call the API "
                                 "from a browser, or `[\"*\"]`; empty: no CORS headers, "
                                 "preflights refused.",
    "server.cors.allow_credentials": "Send `Access-Control-Allow-Credentials: true` to listed "
                                     "origins (never with `*`).",
    "server.cors.max_age_s": "How long a browser may cache a preflight answer.",
    "server.responses_store": "Stored responses of `POST /v1/responses` (`store: true`, for "
                              "`previous_response_id`), in `data_dir/responses.sqlite3`.",
    "server.responses_store.max_entries": "At most this many are kept; the oldest go first.",
    "server.responses_store.max_age_s": "Older ones are deleted (OpenAI keeps 30 days).",
    "server.header_timeout_s": "A request's line and headers must arrive within this from its "
                               "first byte, else the connection is closed.",
    "server.body_timeout_s": "A request body must arrive whole within this, else 408 and the "
                             "connection is closed (a slowly dribbled body included).",
    "server.idle_timeout_s": "A connection with no request under way (a new silent one "
                             "included) is closed after this.",
    "server.max_connections": "Open HTTP connections at most; lowered to what the open-file "
                              "limit (`ulimit -n`) allows. At the cap a new connection "
                              "displaces the oldest idle one.",
    "server.reserved_connections": "Of `max_connections`, kept for `/health/*`, `/admin/*` and "
                                   "`/metrics`: other requests beyond the rest get 503.",
    "logging": "Log output.",
    "logging.format": "`text` for people, `json` for log shippers (`--log-format`).",
    "logging.level": "Minimum level logged.",
    "mesh": "Peers, gossip and forwarding (docs/mesh.md, docs/protocol.md).",
    "mesh.enabled": "Join a mesh and serve gRPC; off: a standalone node.",
    "mesh.listen_addr": "gRPC `HOST:PORT` (`--grpc-listen`); port 0 picks a free one.",
    "mesh.advertise_addr": "The address peers dial; default `listen_addr` (a wildcard host is "
                           "replaced by this host's address).",
    "mesh.seeds": "`HOST:PORT` of peers to join through; a DNS name may resolve to several "
                  "addresses (a Kubernetes headless Service).",
    "mesh.mdns": "Find peers by mDNS (`_meshnode._tcp.local.`) on the interfaces that carry "
                 "`listen_addr` (loopback only when it is 127.0.0.1).",
    "mesh.mdns_interfaces": "Interfaces to announce and browse on instead.",
    "mesh.gossip_interval_ms": "Anti-entropy rounds and state publishing (docs/operations.md: "
                               "LAN and WAN tuning).",
    "mesh.probe_interval_ms": "SWIM: one direct probe per interval.",
    "mesh.probe_timeout_ms": "SWIM: direct ack timeout (indirect probes get twice this).",
    "mesh.indirect_probes": "SWIM: peers asked to probe a member that missed its ack.",
    "mesh.suspicion_mult": "Suspect -> dead after `suspicion_mult * max(1, log10 n) * "
                           "probe_interval`.",
    "mesh.dead_forget_s": "Dead and left members are forgotten after this.",
    "mesh.secret": "Shared mesh key (use `${MESH_SECRET}`); peers without it are refused.",
    "mesh.tls": "Mutual TLS for gRPC when all three files are set.",
    "mesh.tls.cert_file": "This node's certificate (PEM).",
    "mesh.tls.key_file": "Its private key (PEM).",
    "mesh.tls.ca_file": "The CA that signs every peer's certificate (PEM).",
    "mesh.max_hops": "A forwarded request visits at most this many nodes.",
    "mesh.insecure": "Allow a mesh without `secret` or TLS on a non-loopback address, or under `auth.enabled` (docs/security.md).",
    "providers": "Where answers come from, by provider name. The name is the type unless "
                 "`type` is set (docs/providers.md).",
    "providers.*.type": "`openai`, `openai_compatible`, `anthropic`, `cloudflare`, `local`, or "
                        "the preset `together`; default: the provider's name.",
    "providers.*.enabled": "Off: the provider is not built.",
    "providers.*.priority": "Lower first: the default fallback chain and ties in ranking.",
    "providers.*.base_url": "Upstream URL; defaults per type (openai, anthropic, cloudflare, "
                            "together).",
    "providers.*.credentials": "`api_key` (openai, anthropic, openai_compatible), `account_id` "
                               "+ `api_token` (cloudflare). Use `${VAR}`: never commit a key.",
    "providers.*.headers": "Extra HTTP headers sent upstream.",
    "providers.*.models": "The models this provider offers.",
    "providers.*.max_concurrency": "Requests in flight to this provider at most.",
    "providers.*.device": "local: `auto`, `cpu`, `cuda` or `cuda:N`.",
    "providers.*.max_batch": "local: sequences decoded together.",
    "providers.*.max_queue": "local: requests waiting beyond the batch before 503.",
    "providers.*.dtype": "local: weights and KV cache; `auto` = bfloat16 on a GPU that has it "
                         "(float16 otherwise), float32 on the CPU.",
    "providers.*.max_len": "local: positions per KV slot (prompt + max_tokens); 0 = the "
                           "model's context. The slot count (`max_batch`) shrinks to what "
                           "fits in free memory.",
    "providers.*.prefill_chunk": "local: prompt positions prefilled per step; running streams "
                                 "wait at most one chunk for a newcomer.",
    "providers.*.prefix_cache_mb": "local: memory for reused prompt prefixes; -1 = a quarter "
                                   "of the KV slots' size, 0 = off.",
    "providers.*.cuda_graphs": "local: capture the decode step as CUDA graphs (GPU only).",
    "providers.*.models[].name": "The model name clients ask for; several providers may offer "
                                 "one name (routing chooses).",
    "providers.*.models[].kind": "What it answers: chat (and completions), completion, "
                                 "embedding or image.",
    "providers.*.models[].path": "local: a model directory (Hugging Face layout), or a "
                                 "`.gguf` file (or a directory holding exactly one), "
                                 "dequantised once into `data_dir`.",
    "providers.*.models[].builtin": "local: `minilm` (embeddings), `smollm2` "
                                    "(SmolLM2-135M-Instruct, a real chat model) or `tiny-gpt2` "
                                    "(random weights, noise; for fast tests).",
    "providers.*.models[].matryoshka": "local embedding models: the model was trained so a "
                                       "prefix of its vector is an embedding (Matryoshka); "
                                       "`dimensions` then keeps the first N values, "
                                       "renormalised. Otherwise `dimensions` is a 400.",
    "providers.*.models[].openai_model": "openai / openai_compatible: the upstream's model name.",
    "providers.*.models[].anthropic_model": "anthropic: the upstream's model name.",
    "providers.*.models[].cloudflare_model": "cloudflare: the upstream's model name (`@cf/...`).",
    "providers.*.models[].cost_per_1k_tokens": "USD per 1,000 tokens, input and output alike.",
    "providers.*.models[].cost_per_1k_input": "USD per 1,000 prompt tokens (overrides the above).",
    "providers.*.models[].cost_per_1k_output": "USD per 1,000 completion tokens (overrides the "
                                               "above).",
    "providers.*.models[].max_context_tokens": "Bounds a call's worst-case cost for budget "
                                               "reservations.",
    "routing": "How a request picks its provider (docs/policies.md).",
    "routing.strategy": "Ranking of the candidates (`cache_aware`: where the prompt's KV cache is, "
                        "load permitting; docs/policies.md).",
    "routing.failover": "Retries and fallbacks before the first byte reaches the client.",
    "routing.failover.enabled": "Off: one attempt only.",
    "routing.failover.fallback_chain": "Providers (names or kinds, and `mesh`) allowed, in order; "
                                       "default: every enabled provider by priority, then mesh.",
    "routing.failover.max_retries": "Attempts after the first.",
    "routing.failover.backoff": "Wait before re-trying a candidate that already failed.",
    "routing.failover.backoff.initial_ms": "First wait.",
    "routing.failover.backoff.max_ms": "Longest wait.",
    "routing.failover.backoff.multiplier": "Growth per retry.",
    "routing.failover.backoff.jitter": "Random share added or removed.",
    "routing.failover.cooldown": "A failing candidate is ranked last for a while.",
    "routing.failover.cooldown.failures": "Consecutive failures that start a cooldown.",
    "routing.failover.cooldown.seconds": "First cooldown; doubles while probes fail.",
    "routing.failover.cooldown.max_seconds": "Longest cooldown.",
    "routing.failover.cooldown.max_retry_after_s": "Cap on an upstream's `Retry-After`.",
    "routing.timeouts": "Per request.",
    "routing.timeouts.connect_ms": "TCP/TLS connect to an upstream or peer.",
    "routing.timeouts.first_byte_ms": "Until the first byte of an answer.",
    "routing.timeouts.total_ms": "The whole request (504 after it).",
    "routing.policies": "Ordered rules; the first that matches applies.",
    "routing.policies[].name": "Shown in `x_aiproxy.policy` and errors.",
    "routing.policies[].match": "All given conditions must hold.",
    "routing.policies[].match.header": "Request headers and the values they must contain.",
    "routing.policies[].match.model": "Model name glob.",
    "routing.policies[].match.key": "API key name.",
    "routing.policies[].match.min_prompt_tokens": "Estimated prompt size at least this.",
    "routing.policies[].allow": "Provider names or kinds that may serve; nothing else is tried.",
    "routing.policies[].strategy": "Overrides `routing.strategy`.",
    "routing.policies[].max_cost_per_1k": "Skip offers dearer than this (USD per 1k tokens).",
    "routing.policies[].deadline_ms": "Bounds the whole request.",
    "routing.overflow_queue_depth": "The local worker overflows to the next candidate past this "
                                    "queue depth.",
    "cache": "Response cache (docs/cache.md).",
    "cache.enabled": "Answer deterministic repeats from memory.",
    "cache.max_entries": "LRU bound (0: keep nothing).",
    "cache.ttl_s": "Entry lifetime (0: forever).",
    "cache.persist": "Keep entries in `data_dir` across restarts.",
    "cache.semantic": "Answer near-duplicates by embedding similarity.",
    "cache.semantic.enabled": "Off by default.",
    "cache.semantic.model": "Embedding model used for the lookup (routed like any request).",
    "cache.semantic.threshold": "Cosine similarity needed for a hit.",
    "cache.semantic.models": "Models whose answers may be served semantically (empty: none).",
    "budget": "Spend limits in USD (docs/governance.md).",
    "budget.enabled": "Track and enforce spend.",
    "budget.daily_limit": "Per UTC day; paid providers are skipped beyond it.",
    "budget.monthly_limit": "Per UTC calendar month.",
    "budget.scope": "`node`: this node's spend; `mesh`: every node's, gossiped.",
    "budget.max_reservation": "Reserved for a call whose worst case cannot be bounded.",
    "auth": "API keys (docs/governance.md). Off: anyone who reaches the port may call.",
    "auth.enabled": "Require a key on `/v1/*`; an admin key on `/admin/*` and `/metrics`.",
    "auth.keys": "Keys from the config (read-only); `meshnode keys create` stores others.",
    "auth.keys[].name": "Key name (logs, limits, policies).",
    "auth.keys[].key_sha256": "SHA-256 hex of the secret; the secret itself is never stored.",
    "auth.keys[].rpm": "Requests per minute, per node.",
    "auth.keys[].tpm": "Tokens per minute, per node.",
    "auth.keys[].daily_limit": "USD per UTC day for this key.",
    "auth.keys[].monthly_limit": "USD per UTC month for this key.",
    "auth.keys[].models": "Models this key may use (default: all).",
    "auth.keys[].admin": "May read `/admin/*`, `/metrics` and manage keys.",
}


# --------------------------------------------------------------------------- walking the models
def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The nested model of a field (if any) and how its path continues (`.`, `[]`, `.*`)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    if origin in (list, tuple) and args:
        inner, _ = _model_of(args[0])
        return inner, "[]"
    if origin is dict and len(args) == 2:
        inner, _ = _model_of(args[1])
        return inner, ".*"
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            inner, suffix = _model_of(arg)
            if inner is not None:
                return inner, suffix
    return None, ""


def walk(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field as (dotted path, FieldInfo), depth first, in declaration order."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, field
        inner, suffix = _model_of(field.annotation)
        if inner is not None:
            yield from walk(inner, f"{path}{suffix}.")


def missing_descriptions() -> tuple[list[str], list[str]]:
    """(fields without a description, descriptions of fields that do not exist)."""
    paths = [p for p, _ in walk()]
    return ([p for p in paths if p not in DESCRIPTIONS],
            [p for p in DESCRIPTIONS if p not in set(paths)])


# --------------------------------------------------------------------------- rendering
def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " \\| ".join(parts) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"map of {_type(args[0])} to {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return ""
    else:
        value = field.default
    if value is None:
        return "null"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{json.dumps(value)}`"


def _bounds(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Gt):
            out.append(f"> {meta.gt}")
        elif isinstance(meta, annotated_types.Ge):
            out.append(f">= {meta.ge}")
        elif isinstance(meta, annotated_types.Lt):
            out.append(f"< {meta.lt}")
        elif isinstance(meta, annotated_types.Le):
            out.append(f"<= {meta.le}")
        elif isinstance(meta, annotated_types.MinLen):
            out.append("not empty")
        elif getattr(meta, "pattern", None):
            out.append(f"matches `{meta.pattern}`")
    return ", ".join(out)


HEADER = """# Configuration reference

<!-- Generated by `python -m meshnode.config_doc --write` from the models in
meshnode/config.py. Do not edit by hand: tests/unit/test_config_doc.py fails when it is stale. -->

A config file is YAML or JSON (`meshnode run --config PATH`; check it with
`meshnode check-config PATH`). `${VAR}` and `${VAR:-default}` are expanded from the environment
in every string. Unknown keys are errors, and every error names its path
(`providers.openai.models[0].cost_per_1k_tokens: must be >= 0`). Command-line flags override the
file: `--listen` (`server.listen_addr`), `--grpc-listen` (`mesh.listen_addr`), `--seed`
(`mesh.seeds`), `--node-id` (`node.id`), `--data-dir` (`node.data_dir`), `--log-format`
(`logging.format`). How the pieces fit: [configuration.md](configuration.md); a written
example of every section: [deploy/config/full.yaml](../deploy/config/full.yaml).

In paths, `providers.*` is any provider name and `[]` an item of a list.
"""


def _embedded_default_section() -> str:
    keys = {"OPENAI_API_KEY": "…", "ANTHROPIC_API_KEY": "…", "CLOUDFLARE_ACCOUNT_ID": "…",
            "CLOUDFLARE_API_TOKEN": "…", "TOGETHER_API_KEY": "…"}
    providers = embedded_default(keys)["providers"]
    lines = ["## With no config file", "",
             "`meshnode run` with no `--config` uses the embedded default: every setting above "
             "at its default, plus these providers (a cloud provider only when its variables "
             "are set; `deploy/quickstart.sh` writes the same providers into a file):", "",
             "| provider | switched on by | models |", "|---|---|---|"]
    env_of = {"local": "always", "cloudflare": "`CLOUDFLARE_ACCOUNT_ID` + `CLOUDFLARE_API_TOKEN`",
              "openai": "`OPENAI_API_KEY`", "anthropic": "`ANTHROPIC_API_KEY`",
              "together": "`TOGETHER_API_KEY`"}
    for name, provider in providers.items():
        models = ", ".join(f"`{m['name']}`" for m in provider["models"])
        lines.append(f"| {name} | {env_of.get(name, '?')} | {models} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    sections: dict[str, list[str]] = {}
    order: list[str] = []
    for path, field in walk():
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if parent not in sections:
            sections[parent] = []
            order.append(parent)
        key = path.rsplit(".", 1)[-1]
        row = (f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {_bounds(field)} | "
               f"{DESCRIPTIONS.get(path, '')} |")
        sections[parent].append(row)
    out = [HEADER]
    for parent in order:
        title = f"`{parent}`" if parent else "Top level"
        intro = DESCRIPTIONS.get(parent, "")
        out.append(f"## {title}\n")
        if intro:
            out.append(intro + "\n")
        out.append("| key | type | default | bounds | meaning |\n|---|---|---|---|---|")
        out.append("\n".join(sections[parent]) + "\n")
    out.append(_embedded_default_section())
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshnode.config_doc",
                                     description="Generate docs/config-reference.md.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {DOC_PATH.name}")
    group.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    missing, extra = missing_descriptions()
    if missing or extra:
        for path in missing:
            print(f"config_doc: no description for {path}", file=sys.stderr)
        for path in extra:
            print(f"config_doc: description for a field that does not exist: {path}",
                  file=sys.stderr)
        return 1
    text = render()
    if args.write:
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
        return 0
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is stale: run python -m meshnode.config_doc --write",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
