"""A data_dir's state files on real node processes: the spend ledger is never silently reset.

One node spends (a priced model on the fake OpenAI upstream) and stops; then its spend.db is
deleted, truncated to 0 bytes, cut in half, or its write-ahead log damaged after a SIGKILL.
Each time the next start refuses with one line naming the file and `--reset-ledger`, and no
traceback; `--reset-ledger` starts afresh with the old files kept. A damaged answer cache is
rebuilt with a warning; a damaged keys.db is one line naming it.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.fake_openai import FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess, NodeStartError

pytestmark = pytest.mark.slow

PRICE_PER_1K = 1.0


def _config(upstream: str, persist_cache: bool = False) -> dict[str, Any]:
    return {
        "mesh": {"enabled": False, "mdns": False},
        "budget": {"enabled": True, "daily_limit": 100.0, "scope": "node"},
        "cache": {"enabled": True, "persist": persist_cache},
        "providers": {"openai": {"base_url": upstream, "credentials": {"api_key": "sk-fake"},
                                 "models": [{"name": "gpt-4o", "openai_model": "gpt-4o",
                                             "cost_per_1k_tokens": PRICE_PER_1K}]}},
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess() as fake:
        yield fake


def _spend(node: NodeProcess, text: str) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
    request = urllib.request.Request(node.url + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        assert response.status == 200


def _spent(node: NodeProcess) -> float:
    with urllib.request.urlopen(node.url + "/admin/stats", timeout=10) as response:  # noqa: S310
        stats = json.loads(response.read())
    return float(stats["budget"]["spent_today"])


def _node(upstream: FakeOpenAIProcess, workdir: Path, *extra: str,
          persist_cache: bool = False) -> NodeProcess:
    return NodeProcess(_config(upstream.base_url, persist_cache), workdir, node_id="ledger",
                       extra_args=extra)


def _refusal(node: NodeProcess) -> str:
    with pytest.raises(NodeStartError):
        node.start()
    logs = node.logs()
    assert node.returncode == 1, logs
    assert "Traceback" not in logs
    (line,) = [r["msg"] for r in node.log_records() if r.get("level") == "error"]
    return str(line)


@pytest.fixture
def spent_dir(upstream: FakeOpenAIProcess, tmp_path: Path) -> Path:
    """A data_dir whose ledger has spent something; the node stopped cleanly."""
    with _node(upstream, tmp_path) as node:
        _spend(node, "spend a little")
        assert _spent(node) > 0
    return tmp_path / "node-data"


@pytest.mark.parametrize("damage", ["deleted", "empty", "cut-in-half"])
def test_a_lost_ledger_refuses_to_start_until_reset(upstream: FakeOpenAIProcess, tmp_path: Path,
                                                    spent_dir: Path, damage: str) -> None:
    spend_db = spent_dir / "spend.db"
    if damage == "deleted":
        spend_db.unlink()
    elif damage == "empty":
        spend_db.write_bytes(b"")
    else:
        data = spend_db.read_bytes()
        spend_db.write_bytes(data[: len(data) // 2])
    line = _refusal(_node(upstream, tmp_path))
    assert str(spend_db) in line and "--reset-ledger" in line
    with _node(upstream, tmp_path, "--reset-ledger") as node:
        assert _spent(node) == 0
        _spend(node, "after the reset")
    kept = sorted(p.name for p in spent_dir.glob("spend.db.broken-*"))
    assert bool(kept) == (damage != "deleted")  # the damaged file is kept, not deleted
    with _node(upstream, tmp_path) as node:  # and the new ledger is remembered
        assert _spent(node) > 0


def test_a_damaged_write_ahead_log_refuses_to_start(upstream: FakeOpenAIProcess,
                                                     tmp_path: Path) -> None:
    node = _node(upstream, tmp_path).start()
    for i in range(3):
        _spend(node, f"spend number {i}")
    node.kill()  # no clean stop: the spend is in the log, not yet in spend.db
    wal = tmp_path / "node-data" / "spend.db-wal"
    data = bytearray(wal.read_bytes())
    frame = 24 + 4096
    assert len(data) >= 32 + 3 * frame
    data[32 + 24 + 50] ^= 0xFF  # the first frame's page
    wal.write_bytes(bytes(data))
    line = _refusal(_node(upstream, tmp_path))
    assert "spend.db-wal" in line and "--reset-ledger" in line


def test_a_damaged_cache_is_rebuilt_with_a_warning(upstream: FakeOpenAIProcess,
                                                   tmp_path: Path) -> None:
    with _node(upstream, tmp_path, persist_cache=True) as node:
        _spend(node, "cache this")
    cache_file = tmp_path / "node-data" / "response_cache.sqlite3"
    assert cache_file.exists()
    cache_file.write_bytes(b"not a database at all" * 100)
    with _node(upstream, tmp_path, persist_cache=True) as node:
        _spend(node, "served with a fresh cache")
        warnings = [r["msg"] for r in node.log_records() if r.get("level") == "warning"]
    assert any(str(cache_file) in w and "empty cache" in w for w in warnings), warnings
    assert "Traceback" not in node.logs()


def test_a_damaged_key_store_is_one_line(upstream: FakeOpenAIProcess, tmp_path: Path,
                                         spent_dir: Path) -> None:
    keys_db = spent_dir / "keys.db"
    shutil.copy(keys_db, tmp_path / "keys.db.orig")
    keys_db.write_bytes(b"\x00garbage" * 512)
    for suffix in ("-wal", "-shm"):
        keys_db.with_name("keys.db" + suffix).unlink(missing_ok=True)
    line = _refusal(_node(upstream, tmp_path))
    assert str(keys_db) in line
