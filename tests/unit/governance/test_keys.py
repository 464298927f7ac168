import sqlite3
from pathlib import Path

import pytest

from meshnode.config import KeyConfig
from meshnode.errors import InvalidRequest
from meshnode.governance.keys import KeyRecord, KeyStore, hash_secret


class Clock:
    t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def store(path: Path, node: str = "a", config: list[KeyConfig] | None = None,
          clock: Clock | None = None, authorized: bool = True) -> KeyStore:
    s = KeyStore(path, config or [], node_id=node, clock=clock or Clock(),
                 authorized=authorized)
    s.open()
    return s


def test_create_returns_the_secret_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    s = store(tmp_path / "keys.db")
    record, secret = s.create("ci", rpm=60, tpm=1000, daily_limit=5.0, models=["gpt-4o"])
    assert secret.startswith("sk-") and len(secret) > 40
    assert record.key_sha256 == hash_secret(secret)
    assert s.lookup(secret) == record
    assert s.lookup(secret + "x") is None
    raw = (tmp_path / "keys.db").read_bytes() + (tmp_path / "keys.db-wal").read_bytes()
    assert secret.encode() not in raw
    assert "key_sha256" not in record.public()
    assert record.allows_model("gpt-4o") and not record.allows_model("other")


def test_duplicate_and_bad_names_are_refused(tmp_path: Path) -> None:
    s = store(tmp_path / "k.db", config=[KeyConfig(name="ops", key_sha256="a" * 64)])
    s.create("ci")
    with pytest.raises(InvalidRequest):
        s.create("ci")
    with pytest.raises(InvalidRequest):
        s.create("ops")
    with pytest.raises(InvalidRequest):
        s.create("bad name")


def test_revoke_refuses_the_key_and_a_new_one_may_take_the_name(tmp_path: Path) -> None:
    s = store(tmp_path / "k.db")
    _, old = s.create("ci")
    s.revoke("ci")
    assert s.lookup(old) is None
    assert s.get("ci") is None
    _, new = s.create("ci")
    assert s.lookup(new) is not None and s.lookup(old) is None
    with pytest.raises(InvalidRequest):
        s.revoke("nobody")


def test_config_keys_authenticate_and_cannot_be_revoked_here(tmp_path: Path) -> None:
    secret = "sk-config-secret-123456"
    s = store(tmp_path / "k.db", config=[KeyConfig(name="ops", key_sha256=hash_secret(secret),
                                                   admin=True)])
    rec = s.lookup(secret)
    assert rec is not None and rec.admin and rec.source == "config"
    with pytest.raises(InvalidRequest):
        s.revoke("ops")
    assert [r.name for r in s.records()] == ["ops"]
    assert s.export_records() == []  # config keys are not gossiped


def test_a_running_store_sees_another_process_writes_on_refresh(tmp_path: Path) -> None:
    node = store(tmp_path / "k.db", "node")
    cli = store(tmp_path / "k.db", "cli")
    assert node.refresh() is False
    _, secret = cli.create("new")
    assert node.lookup(secret) is None
    assert node.refresh() is True
    assert node.lookup(secret) is not None
    cli.revoke("new")
    node.refresh()
    assert node.lookup(secret) is None


def test_gossip_merge_is_last_writer_wins_and_revocation_sticks(tmp_path: Path) -> None:
    clock = Clock()
    a = store(tmp_path / "a.db", "a", clock=clock)
    c = store(tmp_path / "c.db", "c", clock=clock)
    _, secret = a.create("ci")
    assert c.merge_records(a.export_records()) == 1
    assert c.lookup(secret) is not None  # created on A, works on C
    c.revoke("ci")  # same clock: the version still grows past A's
    stale = a.export_records()
    assert a.merge_records(c.export_records()) == 1
    assert a.lookup(secret) is None  # revoked on C, refused on A
    assert c.merge_records(stale) == 0  # a late copy of the live record loses
    assert c.lookup(secret) is None
    # Restart: merged records were persisted.
    a.close()
    assert store(tmp_path / "a.db", "a").lookup(secret) is None


def test_wire_form_round_trips_and_rejects_garbage() -> None:
    rec = KeyRecord(name="ci", key_sha256="b" * 64, rpm=5, models=("m",), version=3, origin="a",
                    authorized=True)
    assert KeyRecord.from_wire(rec.to_wire()) == rec
    # A peer from before the flag sends 12 fields: read, but as not authorised.
    old = KeyRecord.from_wire(rec.to_wire()[:-1])
    assert old is not None and not old.authorized and old.name == "ci"
    for bad in (None, [], ["x"] * 12, rec.to_wire()[:-2], [*rec.to_wire(), 1],
                ["bad name", "b" * 64, None, None, None, None, None, False, 0, False, 1, "a"],
                ["ci", "zz", None, None, None, None, None, False, 0, False, 1, "a"],
                ["ci", "b" * 64, -1, None, None, None, None, False, 0, False, 1, "a"]):
        assert KeyRecord.from_wire(bad) is None


def test_store_file_has_no_secret_column(tmp_path: Path) -> None:
    store(tmp_path / "k.db")
    cols = [r[1] for r in sqlite3.connect(tmp_path / "k.db").execute("PRAGMA table_info(keys)")]
    assert "secret" not in cols and "key_sha256" in cols


def test_records_written_with_auth_off_stay_local(tmp_path: Path) -> None:
    """An auth-off node's key (its own shell's `meshnode keys`) works there, is not exported,
    and a peer refuses it even when it arrives (a forged or old digest)."""
    off = store(tmp_path / "off.db", "off", authorized=False)
    on = store(tmp_path / "on.db", "on")
    record, secret = off.create("minted", admin=True)
    assert not record.authorized and off.lookup(secret) is not None
    assert off.export_records() == []
    refused: list[KeyRecord] = []
    assert on.merge_records([record], refused) == 0
    assert refused == [record] and on.lookup(secret) is None
    # Revocations need the flag too: an auth-off tombstone does not revoke a live key.
    live, live_secret = on.create("ci")
    off.merge_records([live])  # not authorised to write, but it may read what arrives
    tomb = off.revoke("ci")
    assert not tomb.authorized
    assert on.merge_records([tomb]) == 0 and on.lookup(live_secret) is not None


def test_a_keys_db_from_before_the_flag_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE keys (name TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL, rpm INTEGER, "
        "tpm INTEGER, daily_limit REAL, monthly_limit REAL, models TEXT, admin INTEGER NOT NULL, "
        "created_at REAL NOT NULL, revoked INTEGER NOT NULL, version INTEGER NOT NULL, "
        "origin TEXT NOT NULL)"
    )
    db.execute("INSERT INTO keys VALUES ('old', ?, NULL, NULL, NULL, NULL, NULL, 1, 0, 0, 1, 'x')",
               (hash_secret("sk-old"),))
    db.commit()
    db.close()
    s = store(path)
    found = s.lookup("sk-old")
    assert found is not None and not found.authorized
    assert s.export_records() == []
