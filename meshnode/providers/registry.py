"""Builds Provider objects from the resolved provider configs.

Adapters are imported lazily by type, so a node that uses no local models never imports torch.
Every adapter class takes `(resolved: ResolvedProvider, ctx: ProviderContext)`.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from meshnode.config import Config, ResolvedProvider, TimeoutsConfig
from meshnode.errors import ConfigError
from meshnode.providers.base import Provider

log = logging.getLogger(__name__)

# effective provider type -> "module:Class"
ADAPTERS: dict[str, str] = {
    "openai": "meshnode.providers.openai_compat:OpenAICompatProvider",
    "openai_compatible": "meshnode.providers.openai_compat:OpenAICompatProvider",
    "anthropic": "meshnode.providers.anthropic:AnthropicProvider",
    "cloudflare": "meshnode.providers.cloudflare:CloudflareProvider",
    "local": "meshnode.providers.local:LocalProvider",
}


@dataclass(frozen=True, slots=True)
class ProviderContext:
    """What every adapter may know about the node it runs in."""

    node_id: str
    data_dir: Path
    timeouts: TimeoutsConfig


def adapter_class(provider_type: str) -> type[Provider]:
    target = ADAPTERS[provider_type]
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls: type[Provider] = getattr(module, class_name)
    return cls


def build_providers(config: Config, ctx: ProviderContext) -> list[Provider]:
    """One Provider per enabled provider, in priority order. Raises ConfigError on a provider
    that cannot be built (a missing credential, an unreadable model path)."""
    providers: list[Provider] = []
    errors: list[str] = []
    for resolved in config.resolved_providers():
        try:
            providers.append(build_provider(resolved, ctx))
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return providers


def build_provider(resolved: ResolvedProvider, ctx: ProviderContext) -> Provider:
    cls = adapter_class(resolved.type)
    return cls(resolved, ctx)  # type: ignore[call-arg]
