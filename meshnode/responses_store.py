"""Stored responses of the Responses API (`store: true`), for `previous_response_id` and
`GET`/`DELETE /v1/responses/{id}`.

One SQLite file in `data_dir` (`responses.sqlite3`), or memory when no directory is given (the
app factory's default, for tests). Each row is one response: its id, the scope it belongs to
(the caller's API key name; `""` when auth is off), when it was made, the response object as
the client got it, and the conversation that led to it (the earlier turns, this call's input
items and its output items) so the next call can continue it without walking a chain.

Bounds: rows older than `max_age_s` are deleted, and past `max_entries` the oldest go, both
checked on every write. A response is only ever visible to its own scope: another key's id
reads as "not found", never "forbidden", so ids leak nothing.

sqlite3 is blocking I/O: every call runs on one worker thread (which also gives the connection
a single user), never on the event loop. This module knows nothing of HTTP or of the Responses
wire beyond storing its JSON.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

FILE_NAME = "responses.sqlite3"
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_AGE_S = 30 * 24 * 3600.0  # OpenAI keeps stored responses for 30 days
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    created_at REAL NOT NULL,
    response BLOB NOT NULL,
    conversation BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at);
"""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # input items then output items, oldest first


class ResponseStore:
    """Stored responses, scoped by API key, bounded by age and count."""

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Any = time.time,
    ) -> None:
        self.path = Path(data_dir) / FILE_NAME if data_dir is not None else None
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="responses-db")
        self._conn: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ on the worker thread
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path is None:
                conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def _sync_put(self, scope: str, response: dict[str, Any],
                  conversation: list[dict[str, Any]]) -> None:
        db = self._db()
        now = self._clock()
        db.execute("BEGIN")
        try:
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                (response["id"], scope, now, orjson.dumps(response), orjson.dumps(conversation)),
            )
            db.execute("DELETE FROM responses WHERE created_at < ?", (now - self.max_age_s,))
            db.execute(
                "DELETE FROM responses WHERE id IN (SELECT id FROM responses "
                "ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                (self.max_entries,),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _sync_get(self, scope: str, response_id: str) -> StoredResponse | None:
        row = self._db().execute(
            "SELECT response, conversation FROM responses "
            "WHERE id = ? AND scope = ? AND created_at >= ?",
            (response_id, scope, self._clock() - self.max_age_s),
        ).fetchone()
        if row is None:
            return None
        return StoredResponse(response_id, orjson.loads(row[0]), orjson.loads(row[1]))

    def _sync_delete(self, scope: str, response_id: str) -> bool:
        cursor = self._db().execute(
            "DELETE FROM responses WHERE id = ? AND scope = ?", (response_id, scope))
        return cursor.rowcount > 0

    def _sync_count(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def _sync_close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ async API
    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def put(self, scope: str, response: dict[str, Any],
                  conversation: list[dict[str, Any]]) -> None:
        await self._run(self._sync_put, scope, response, conversation)

    async def get(self, scope: str, response_id: str) -> StoredResponse | None:
        result: StoredResponse | None = await self._run(self._sync_get, scope, response_id)
        return result

    async def delete(self, scope: str, response_id: str) -> bool:
        return bool(await self._run(self._sync_delete, scope, response_id))

    async def count(self) -> int:
        return int(await self._run(self._sync_count))

    async def close(self) -> None:
        await self._run(self._sync_close)
        self._executor.shutdown(wait=True)


__all__ = ["FILE_NAME", "ResponseStore", "StoredResponse"]
