"""`meshnode.state_files`: damaged SQLite files and write-ahead logs are named, never trusted.

The logs are real ones: SQLite writes them (a connection left open keeps its log, as a killed
process does), the test copies the files and damages the copy."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from meshnode.errors import StateFileError
from meshnode.state_files import open_checked, set_aside, wal_damage

PAGE = 4096
FRAME = 24 + PAGE


def _crashed_copy(tmp_path: Path, transactions: int = 5) -> Path:
    """A database whose log holds `transactions` commits, copied as a killed process leaves it."""
    live = tmp_path / "live.db"
    db = sqlite3.connect(live, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (v TEXT)")
    for i in range(transactions):
        db.execute("INSERT INTO t VALUES (?)", ("x" * 3000 + str(i),))
    copy = tmp_path / "copy.db"
    shutil.copy(live, copy)
    shutil.copy(live.with_name("live.db-wal"), copy.with_name("copy.db-wal"))
    db.close()
    return copy


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _frames(db: Path) -> int:
    return (db.with_name(db.name + "-wal").stat().st_size - 32) // FRAME


def test_an_intact_log_is_accepted_and_read(tmp_path: Path) -> None:
    db = _crashed_copy(tmp_path)
    assert _frames(db) >= 3
    assert wal_damage(db) is None
    conn = open_checked(db)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (5,)
    conn.close()


def test_a_damaged_frame_with_frames_after_it_is_reported(tmp_path: Path) -> None:
    db = _crashed_copy(tmp_path)
    wal = db.with_name(db.name + "-wal")
    _flip(wal, 32 + FRAME + 24 + 100)  # inside the second frame's page
    problem = wal_damage(db)
    assert problem is not None and "copy.db-wal" in problem and "frame 2" in problem
    with pytest.raises(StateFileError) as raised:
        open_checked(db)
    assert str(db) in raised.value.message


def test_a_damaged_log_header_is_reported(tmp_path: Path) -> None:
    db = _crashed_copy(tmp_path)
    _flip(db.with_name(db.name + "-wal"), 12)  # the checkpoint sequence, under the checksum
    assert "damaged header" in (wal_damage(db) or "")


def test_a_torn_last_frame_is_what_a_kill_leaves_and_is_accepted(tmp_path: Path) -> None:
    db = _crashed_copy(tmp_path)
    last = 32 + (_frames(db) - 1) * FRAME
    _flip(db.with_name(db.name + "-wal"), last + 24 + 10)
    assert wal_damage(db) is None


@pytest.mark.parametrize("content", [b"", b"SQLite format 3\x00" + b"\x00" * 84, b"garbage" * 99])
def test_a_file_that_is_not_a_database_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "spend.db"
    path.write_bytes(content)
    if not content:  # SQLite takes an empty file as a new database: the ledger checks size
        open_checked(path).close()
        return
    with pytest.raises(StateFileError) as raised:
        open_checked(path)
    assert raised.value.message.startswith(str(path))


def test_a_truncated_database_fails_its_check(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE t (v TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [("y" * 500,) for _ in range(200)])
    db.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError) as raised:
        open_checked(path)
    assert str(path) in raised.value.message


def test_set_aside_keeps_every_file(tmp_path: Path) -> None:
    db = _crashed_copy(tmp_path)
    moved = set_aside(db)
    assert {p.name.split(".broken-")[0] for p in moved} == {"copy.db"}
    assert len(moved) == 2 and all(p.exists() for p in moved) and not db.exists()
