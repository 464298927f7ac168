"""docs/config-reference.md is generated from the config models and must not go stale."""

from __future__ import annotations

from meshnode import config_doc
from meshnode.config import Config


def test_every_field_is_described_and_nothing_else() -> None:
    missing, extra = config_doc.missing_descriptions()
    assert missing == [], f"describe these in meshnode/config_doc.py DESCRIPTIONS: {missing}"
    assert extra == [], f"these fields no longer exist: {extra}"


def test_the_committed_reference_is_current() -> None:
    current = config_doc.DOC_PATH.read_text(encoding="utf-8")
    assert current == config_doc.render(), (
        "docs/config-reference.md is stale: run `python -m meshnode.config_doc --write`"
    )
    assert config_doc.main(["--check"]) == 0


def test_the_reference_shows_types_defaults_and_bounds() -> None:
    text = config_doc.render()
    paths = [p for p, _ in config_doc.walk()]
    assert "mesh.tls.ca_file" in paths and "providers.*.models[].openai_model" in paths
    assert "auth.keys[].key_sha256" in paths
    assert len(paths) == len(set(paths)) == len(config_doc.DESCRIPTIONS)
    assert '| `gossip_interval_ms` | integer | `500` | > 0 |' in text
    assert '| `strategy` | `cost_optimized` \\| `latency_optimized`' in text
    assert f'`"{Config().server.listen_addr}"`' in text
    assert "| openai | `OPENAI_API_KEY` | `gpt-4o`" in text
