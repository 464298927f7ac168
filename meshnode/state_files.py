"""The SQLite files in `data_dir`: opened once, checked, and named when they are damaged.

`open_checked(path)` connects with the node's pragmas (WAL, `synchronous=NORMAL`), refuses a
write-ahead log whose frames fail their checksums (`wal_damage`: SQLite itself silently stops
reading a log at its first bad frame, which rolls committed transactions back), and runs
`PRAGMA quick_check`. Every failure is a `StateFileError` whose message names the file, so the
node can refuse to start with one line instead of a traceback. `set_aside(path)` renames a
damaged file (and its -wal and -shm) out of the way, keeping it for inspection.

What each owner does with a damaged file is its own decision: the spend ledger refuses to start
(`meshnode.governance.budget`), the key store too, the answer cache rebuilds
(`meshnode.cache.persist`). This module decides nothing; it opens and checks.
"""

from __future__ import annotations

import sqlite3
import struct
import time
from pathlib import Path

from meshnode.errors import StateFileError

_WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_HEADER = 32
_FRAME_HEADER = 24


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum (https://sqlite.org/fileformat2.html#walformat), continued from
    (s0, s1) over `data` (a multiple of 8 bytes)."""
    words = struct.unpack((">" if big_endian else "<") + f"{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_damage(db_path: Path) -> str | None:
    """What is wrong with `db_path`'s write-ahead log, or None when SQLite will read all of it.

    A frame that fails its checksum while frames of the same log follow it is damage: SQLite
    would drop it and everything after. The log's last frame failing is what a process killed
    between two writes leaves (that transaction never committed), so it is not reported; nor
    are frames left over from before the log was last restarted (other salts)."""
    wal = db_path.with_name(db_path.name + "-wal")
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < _WAL_HEADER:
        return None  # no frame was ever completed
    magic, _version, page_size, _seq, salt1, salt2, ck1, ck2 = struct.unpack(
        ">8I", data[:_WAL_HEADER])
    if magic not in _WAL_MAGIC:
        return f"its write-ahead log {wal.name} has a damaged header" if any(data) else None
    big_endian = bool(magic & 1)
    s0, s1 = _checksum(data[:24], 0, 0, big_endian)
    if (s0, s1) != (ck1, ck2):
        return f"its write-ahead log {wal.name} has a damaged header"
    page_size = 65536 if page_size == 1 else page_size
    frame_size = _FRAME_HEADER + page_size
    bad_frame: int | None = None
    offset, index = _WAL_HEADER, 0
    while offset + frame_size <= len(data):
        header = data[offset:offset + _FRAME_HEADER]
        _page, _commit, fsalt1, fsalt2, fck1, fck2 = struct.unpack(">6I", header)
        if (fsalt1, fsalt2) != (salt1, salt2):
            break  # the log ends here
        index += 1
        if bad_frame is not None:
            return (f"its write-ahead log {wal.name} is damaged at frame {bad_frame} of "
                    f"{index} or more (committed writes after it would be lost)")
        s0, s1 = _checksum(header[:8], s0, s1, big_endian)
        s0, s1 = _checksum(data[offset + _FRAME_HEADER:offset + frame_size], s0, s1, big_endian)
        if (s0, s1) != (fck1, fck2):
            bad_frame = index
        offset += frame_size
    return None


def open_checked(path: Path) -> sqlite3.Connection:
    """Open (creating) the SQLite file at `path` in WAL mode and check it; raises
    `StateFileError` naming the file when it cannot be trusted."""
    damage = wal_damage(path)
    if damage is not None:
        raise StateFileError(path, damage)
    path.parent.mkdir(parents=True, exist_ok=True)
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        if db is not None:
            db.close()
        raise StateFileError(path, f"is not a readable SQLite database ({exc})") from None
    if problems != ["ok"]:
        db.close()
        raise StateFileError(path, f"fails its integrity check ({'; '.join(problems[:3])})")
    return db


def set_aside(path: Path) -> list[Path]:
    """Rename `path` and its -wal/-shm to `NAME.broken-TIMESTAMP...`; returns the new paths."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for suffix in ("", "-wal", "-shm"):
        old = path.with_name(path.name + suffix)
        if old.exists():
            new = path.with_name(f"{path.name}.broken-{stamp}{suffix}")
            old.rename(new)
            moved.append(new)
    return moved
