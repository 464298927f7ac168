"""API keys: the KeyStore over `keys.db` in data_dir, plus the keys written in the config.

A key's secret (`sk-...`) exists only in the answer to `create` (shown once); the store keeps
its SHA-256, its limits and its state. Lookup hashes the presented secret and finds the record
by that hash, then confirms with `hmac.compare_digest`: the time taken does not depend on how
much of a secret matches, and no secret is ever compared or kept in the clear.

Records are versioned for gossip. A write (create, revoke) gives the record the version
`max(now in ms, previous version + 1)` and this node as its origin; `merge_records` keeps, per
name, the record with the larger `(version, origin)` (last writer wins), so a key created on one
node and revoked on another converges to revoked everywhere. A revoked record stays as a
tombstone so that the revocation wins over late copies of the live record.

A record carries whether its origin ran with `auth.enabled` (`authorized`, inside the signed
gossip digest): only authorised records are gossiped or merged (docs/security.md), so an
auth-off node, which cannot tell who asked it, never creates or revokes a key for the mesh. A
record written by `meshnode keys` against an auth-off config is kept and used locally.

Keys from the config (`auth.keys`) are read-only and local: they are not gossiped, and a store
record with the same name as a config key is ignored.

Several processes share `keys.db` (the node and `meshnode keys ...`): the node re-reads it when
SQLite's `data_version` says another connection committed (`refresh()`, polled every second by
the service). Nothing here logs a secret or a hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from meshnode.config import KeyConfig
from meshnode.errors import InvalidRequest
from meshnode.state_files import open_checked

SECRET_PREFIX = "sk-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL,
    rpm INTEGER, tpm INTEGER, daily_limit REAL, monthly_limit REAL, models TEXT,
    admin INTEGER NOT NULL, created_at REAL NOT NULL, revoked INTEGER NOT NULL,
    version INTEGER NOT NULL, origin TEXT NOT NULL,
    authorized INTEGER NOT NULL DEFAULT 0, learned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = ("name, key_sha256, rpm, tpm, daily_limit, monthly_limit, models, admin, created_at, "
            "revoked, version, origin, authorized, learned")


class KeyNotFound(InvalidRequest):
    """No key of that name (404: it names a resource)."""

    status = 404
    code = "key_not_found"


class KeyConflict(InvalidRequest):
    status = 409
    code = "key_exists"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key: who it is, what it may do, and its place in the gossip order."""

    name: str
    key_sha256: str
    rpm: int | None = None
    tpm: int | None = None
    daily_limit: float | None = None
    monthly_limit: float | None = None
    models: tuple[str, ...] | None = None
    admin: bool = False
    created_at: float = 0.0
    revoked: bool = False
    version: int = 0
    origin: str = ""
    authorized: bool = False  # the origin ran with auth.enabled when it wrote this version
    learned: bool = False  # merged from a peer (not gossiped by this node); local, not on the wire
    source: str = "store"  # "store" (keys.db, gossiped) or "config" (auth.keys, local)

    def newer_than(self, other: KeyRecord) -> bool:
        return (self.version, self.origin) > (other.version, other.origin)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, Any]:
        """What `keys list` and /admin/keys show: never the hash."""
        return {
            "name": self.name,
            "admin": self.admin,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "daily_limit": self.daily_limit,
            "monthly_limit": self.monthly_limit,
            "models": list(self.models) if self.models is not None else None,
            "created_at": self.created_at,
            "revoked": self.revoked,
            "source": self.source,
        }

    def to_wire(self) -> list[Any]:
        """Compact form for gossip (see `governance.gossip`)."""
        return [
            self.name, self.key_sha256, self.rpm, self.tpm, self.daily_limit,
            self.monthly_limit, list(self.models) if self.models is not None else None,
            self.admin, self.created_at, self.revoked, self.version, self.origin,
            self.authorized,
        ]

    @classmethod
    def from_wire(cls, item: Any) -> KeyRecord | None:
        """None for anything malformed: a confused peer must not break key lookup."""
        try:
            # 12 fields: a peer from before the `authorized` flag (read as not authorised).
            (name, digest, rpm, tpm, daily, monthly, models, admin, created, revoked,
             version, origin, *rest) = item
            if len(rest) > 1:
                return None
            authorized = bool(rest[0]) if rest else False
            record = cls(
                name=str(name), key_sha256=str(digest).lower(),
                rpm=_opt_int(rpm), tpm=_opt_int(tpm),
                daily_limit=_opt_float(daily), monthly_limit=_opt_float(monthly),
                models=tuple(str(m) for m in models) if models is not None else None,
                admin=bool(admin), created_at=float(created), revoked=bool(revoked),
                version=int(version), origin=str(origin), authorized=authorized,
            )
        except (TypeError, ValueError):
            return None
        if not NAME_PATTERN.fullmatch(record.name) or not _HEX64.fullmatch(record.key_sha256):
            return None
        return record


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) < 0:
        raise ValueError("bad int")
    return int(value)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    if not f >= 0:
        raise ValueError("bad float")
    return f


def record_from_config(key: KeyConfig) -> KeyRecord:
    return KeyRecord(
        name=key.name,
        key_sha256=key.key_sha256.lower(),
        rpm=key.rpm,
        tpm=key.tpm,
        daily_limit=key.daily_limit,
        monthly_limit=key.monthly_limit,
        models=tuple(key.models) if key.models is not None else None,
        admin=key.admin,
        source="config",
    )


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(
            "a key name is 1-64 characters of letters, digits, '.', '_' or '-', starting "
            "with a letter or digit",
            param="name",
        )


class KeyStore:
    def __init__(
        self,
        path: Path,
        config_keys: Sequence[KeyConfig] = (),
        *,
        node_id: str = "cli",
        clock: Callable[[], float] = time.time,
        authorized: bool = False,
    ) -> None:
        """`authorized`: this node runs with auth on, so what it writes may travel."""
        self._path = path
        self._authorized = authorized
        self._node_id = node_id
        self._clock = clock
        self._config = {k.name: record_from_config(k) for k in config_keys}
        self._stored: dict[str, KeyRecord] = {}
        self._by_hash: dict[str, KeyRecord] = {}
        self._db: sqlite3.Connection | None = None
        self._data_version = -1

    # ------------------------------------------------------------------ lifetime
    def open(self) -> None:
        """Raises `StateFileError` naming keys.db when it is damaged."""
        db = open_checked(self._path)
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(keys)")}
        if "authorized" not in columns:  # a keys.db from before the flag: not authorised
            db.execute("ALTER TABLE keys ADD COLUMN authorized INTEGER NOT NULL DEFAULT 0")
        if "learned" not in columns:
            db.execute("ALTER TABLE keys ADD COLUMN learned INTEGER NOT NULL DEFAULT 0")
        self._db = db
        self._reload()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the key store is not open")
        return self._db

    def mark_node_auth(self, enabled: bool) -> None:
        """The node records whether it runs with auth on, so that `meshnode keys` on its
        data_dir (the operator's shell, without --config) writes authorised records."""
        self._conn().execute(
            "INSERT INTO meta (name, value) VALUES ('node_auth', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (str(int(enabled)),))

    def node_auth(self) -> bool:
        row = self._conn().execute("SELECT value FROM meta WHERE name = 'node_auth'").fetchone()
        return row is not None and row[0] == "1"

    def authorize_writes(self, authorized: bool) -> None:
        self._authorized = authorized

    def refresh(self) -> bool:
        """Re-read keys.db if another process (the CLI) committed since; True when it did."""
        version = self._conn().execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return False
        self._reload()
        return True

    def _reload(self) -> None:
        db = self._conn()
        self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
        rows = db.execute(f"SELECT {_COLUMNS} FROM keys").fetchall()
        stored: dict[str, KeyRecord] = {}
        for (name, digest, rpm, tpm, daily, monthly, models, admin, created, revoked,
             version, origin, authorized, learned) in rows:
            stored[name] = KeyRecord(
                name=name, key_sha256=digest, rpm=rpm, tpm=tpm, daily_limit=daily,
                monthly_limit=monthly,
                models=tuple(orjson.loads(models)) if models is not None else None,
                admin=bool(admin), created_at=created, revoked=bool(revoked),
                version=version, origin=origin, authorized=bool(authorized),
                learned=bool(learned),
            )
        self._stored = stored
        self._reindex()

    def _reindex(self) -> None:
        index: dict[str, KeyRecord] = {}
        for record in self._stored.values():
            if not record.revoked and record.name not in self._config:
                index[record.key_sha256] = record
        for record in self._config.values():
            index[record.key_sha256] = record
        self._by_hash = index

    def _write(self, record: KeyRecord) -> None:
        self._conn().execute(
            f"INSERT INTO keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (name) DO UPDATE SET key_sha256=excluded.key_sha256, rpm=excluded.rpm, "
            "tpm=excluded.tpm, daily_limit=excluded.daily_limit, "
            "monthly_limit=excluded.monthly_limit, models=excluded.models, admin=excluded.admin, "
            "created_at=excluded.created_at, revoked=excluded.revoked, version=excluded.version, "
            "origin=excluded.origin, authorized=excluded.authorized, learned=excluded.learned "
            "WHERE (excluded.version, excluded.origin) > "
            "(keys.version, keys.origin)",
            (
                record.name, record.key_sha256, record.rpm, record.tpm, record.daily_limit,
                record.monthly_limit,
                orjson.dumps(list(record.models)).decode() if record.models is not None else None,
                int(record.admin), record.created_at, int(record.revoked), record.version,
                record.origin, int(record.authorized), int(record.learned),
            ),
        )

    def _next_version(self, name: str) -> int:
        current = self._stored.get(name)
        now_ms = int(self._clock() * 1000)
        return max(now_ms, (current.version + 1) if current else 0)

    # ------------------------------------------------------------------ commands
    def create(
        self,
        name: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        daily_limit: float | None = None,
        monthly_limit: float | None = None,
        models: Sequence[str] | None = None,
        admin: bool = False,
    ) -> tuple[KeyRecord, str]:
        """A new key; returns its record and its secret (the only time the secret exists)."""
        check_name(name)
        self.refresh()
        if name in self._config:
            raise KeyConflict(f"a key named {name!r} is defined in the config file", param="name")
        existing = self._stored.get(name)
        if existing is not None and not existing.revoked:
            raise KeyConflict(f"a key named {name!r} exists; revoke it first", param="name")
        for label, value in (("rpm", rpm), ("tpm", tpm), ("daily_limit", daily_limit),
                             ("monthly_limit", monthly_limit)):
            if value is not None and value < 0:
                raise InvalidRequest(f"{label} must be >= 0", param=label)
        secret = new_secret()
        record = KeyRecord(
            name=name,
            key_sha256=hash_secret(secret),
            rpm=rpm,
            tpm=tpm,
            daily_limit=daily_limit,
            monthly_limit=monthly_limit,
            models=tuple(models) if models is not None else None,
            admin=admin,
            created_at=self._clock(),
            version=self._next_version(name),
            origin=self._node_id,
            authorized=self._authorized,
        )
        self._write(record)
        self._reload()
        return record, secret

    def revoke(self, name: str) -> KeyRecord:
        self.refresh()
        if name in self._config:
            raise InvalidRequest(
                f"the key {name!r} is defined in the config file: remove it there", param="name"
            )
        existing = self._stored.get(name)
        if existing is None:
            raise KeyNotFound(f"no key named {name!r}", param="name")
        if existing.revoked:
            return existing
        record = replace(existing, revoked=True, version=self._next_version(name),
                         origin=self._node_id, authorized=self._authorized, learned=False)
        self._write(record)
        self._reload()
        return record

    def records(self) -> list[KeyRecord]:
        """Config keys, then stored ones (revoked included), by name."""
        shown = dict(self._stored)
        shown.update(self._config)
        return sorted(shown.values(), key=lambda r: r.name)

    def get(self, name: str) -> KeyRecord | None:
        """The live record of that name, or None (unknown or revoked)."""
        record = self._config.get(name) or self._stored.get(name)
        if record is None or record.revoked:
            return None
        return record

    def state(self, name: str) -> str:
        """"live", "revoked" (a tombstone), or "unknown" on this node."""
        record = self._config.get(name) or self._stored.get(name)
        if record is None:
            return "unknown"
        return "revoked" if record.revoked else "live"

    def lookup(self, secret: str) -> KeyRecord | None:
        """The live key whose secret this is, or None."""
        digest = hash_secret(secret)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.key_sha256, digest):
            return None
        return record

    @property
    def has_keys(self) -> bool:
        return bool(self._by_hash)

    # ------------------------------------------------------------------ gossip
    def export_records(self) -> list[KeyRecord]:
        """The authorised records this node wrote (tombstones included) for gossip; learned
        records, config keys and records written with auth off are not this node's to send."""
        return [r for r in self._stored.values() if r.authorized and not r.learned]

    def merge_records(self, records: Iterable[KeyRecord],
                      refused: list[KeyRecord] | None = None) -> int:
        """Keep, per name, the newer of ours and theirs; returns how many records changed.
        Records whose origin had auth off are not merged (appended to `refused`)."""
        newer: dict[str, KeyRecord] = {}
        for record in records:
            if record.source != "store":
                continue
            if not record.authorized:
                if refused is not None:
                    refused.append(record)
                continue
            mine = newer.get(record.name) or self._stored.get(record.name)
            if mine is None or record.newer_than(mine):
                newer[record.name] = replace(record, learned=True)
        if not newer:
            return 0  # nothing new: no transaction, no write
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for record in newer.values():
                self._write(record)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._stored.update(newer)
        self._reindex()
        # Our own commit does not move data_version; nothing to re-read.
        return len(newer)
