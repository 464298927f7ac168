"""The optional persistent store: one SQLite file in `data_dir`, written behind the memory store.

The memory store answers every lookup; this file only lets entries outlive a restart. At start
the newest live rows (up to `max_entries`) are loaded; afterwards each store and eviction is
queued to one background thread (sqlite3 is blocking I/O and must not run on the event loop),
so a write never delays an answer. A lost write costs a future miss, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from meshnode.cache.entry import CachedAnswer
from meshnode.errors import StateFileError
from meshnode.state_files import open_checked, set_aside

log = logging.getLogger(__name__)

FILE_NAME = "response_cache.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    answer BLOB NOT NULL,
    context TEXT,
    vector BLOB
);
CREATE INDEX IF NOT EXISTS answers_created ON answers (created_at);
"""


@dataclass(frozen=True, slots=True)
class StoredRow:
    key: str
    answer: CachedAnswer
    context: str | None  # semantic context, when the entry is in the semantic index
    vector: bytes | None  # float32 embedding of the prompt, when semantic


class SqliteStore:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._pending: set[Future[None]] = set()

    # All _sync_* methods run on the one executor thread, so the connection has one user.
    def _sync_open(self, max_entries: int, oldest: float | None) -> list[StoredRow]:
        try:
            conn = open_checked(self.path)
            conn.executescript(_SCHEMA)
        except (StateFileError, sqlite3.DatabaseError) as exc:
            # Disposable: a damaged cache costs misses, never a refusal to start.
            moved = set_aside(self.path)
            log.warning("cache: %s; starting with an empty cache (the old file is kept as %s)",
                        getattr(exc, "message", exc), ", ".join(p.name for p in moved))
            conn = open_checked(self.path)
            conn.executescript(_SCHEMA)
        self._conn = conn
        if oldest is not None:
            conn.execute("DELETE FROM answers WHERE created_at < ?", (oldest,))
        rows = conn.execute(
            "SELECT key, answer, context, vector FROM answers ORDER BY created_at DESC LIMIT ?",
            (max_entries,),
        ).fetchall()
        out: list[StoredRow] = []
        for key, raw, context, vector in reversed(rows):  # oldest first: LRU order
            try:
                out.append(StoredRow(key, CachedAnswer.from_bytes(raw), context, vector))
            except (ValueError, KeyError, TypeError):
                log.warning("dropping an unreadable cache row")
                conn.execute("DELETE FROM answers WHERE key = ?", (key,))
        return out

    def _sync_put(self, row: StoredRow) -> None:
        assert self._conn is not None
        self._conn.execute(
            "INSERT OR REPLACE INTO answers (key, created_at, answer, context, vector) "
            "VALUES (?, ?, ?, ?, ?)",
            (row.key, row.answer.created_at, row.answer.to_bytes(), row.context, row.vector),
        )

    def _sync_delete(self, keys: Sequence[str]) -> None:
        assert self._conn is not None
        self._conn.executemany("DELETE FROM answers WHERE key = ?", [(k,) for k in keys])

    def _sync_close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ async face
    async def open(self, max_entries: int, oldest: float | None) -> list[StoredRow]:
        """Open (creating) the file, drop rows older than `oldest`, return the newest rows."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._sync_open, max_entries, oldest)

    def _submit(self, fn: object, *args: object) -> None:
        future: Future[None] = self._executor.submit(fn, *args)  # type: ignore[arg-type]
        self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        self._pending.discard(future)
        error = future.exception()
        if error is not None:
            log.warning("cache write failed: %s", error)

    def put(self, row: StoredRow) -> None:
        """Queue a write; returns at once."""
        self._submit(self._sync_put, row)

    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            self._submit(self._sync_delete, list(keys))

    async def flush(self) -> None:
        """Wait for the queued writes (tests, shutdown)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, lambda: None)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._sync_close)
        self._executor.shutdown(wait=True)
