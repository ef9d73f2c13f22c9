"""The embedded avatar store and the hot cache: durability, damage, deletion."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from server.store.base import Avatar, AvatarMeta, CachedStore, StoreError
from server.store.local import LocalStore


def make_avatar(avatar_id: str, seed: int = 0, size: int = 16, params: int = 40) -> Avatar:
    rng = np.random.default_rng(seed)
    meta = AvatarMeta(
        id=avatar_id,
        created=1_700_000_000.0 + seed,
        image_size=size,
        preset="small",
        weights_sha256="ab" * 32,
        source_pose=tuple(float(v) for v in rng.uniform(-0.5, 0.5, 136)),
        crop=(100.0, 120.0, 200.0),
        photo_size=(512, 512),
        num_faces=1,
        timings_ms={"register": 12.5},
    )
    texture = rng.uniform(-1, 1, (3, size, size)).astype(np.float32)
    return Avatar(meta=meta, texture=texture, params=rng.standard_normal(params, np.float32))


def assert_same(a: Avatar, b: Avatar) -> None:
    assert a.meta == b.meta
    np.testing.assert_array_equal(a.texture, b.texture)
    np.testing.assert_array_equal(a.params, b.params)


def test_put_get_list_delete_and_restart(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    first, second = make_avatar("aaa", 1), make_avatar("bbb", 2)
    store.put(first)
    store.put(second)

    assert_same(store.get("aaa"), first)
    assert store.get_meta("bbb") == second.meta
    assert [m.id for m in store.list()] == ["aaa", "bbb"]
    assert store.exists("aaa") and not store.exists("zzz")
    assert store.get("zzz") is None
    assert store.health() == {"kind": "local", "avatars": 2, "corrupt": 0}
    store.close()

    # a new process on the same folder sees everything
    reopened = LocalStore(tmp_path)
    assert_same(reopened.get("bbb"), second)
    assert [m.id for m in reopened.list()] == ["aaa", "bbb"]

    # delete removes the file and the row, every byte of the tensors included
    texture_bytes = first.texture.tobytes()[:64]
    assert reopened.delete("aaa") is True
    assert reopened.delete("aaa") is False
    assert reopened.get("aaa") is None
    assert not (tmp_path / "avatars" / "aaa.npz").exists()
    reopened.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert texture_bytes not in path.read_bytes(), path
            assert b'"id":"aaa"' not in path.read_bytes(), path


def test_owner_filter_and_bad_ids(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    mine = make_avatar("mine", 1)
    store.put(Avatar(
        meta=AvatarMeta(**{**mine.meta.__dict__, "owner": "key1"}),
        texture=mine.texture, params=mine.params,
    ))
    store.put(make_avatar("theirs", 2))
    assert [m.id for m in store.list(owner="key1")] == ["mine"]

    # ids that could escape the folder are never looked up, and cannot be stored
    for bad in ("../x", "a/b", "", "x" * 65):
        assert store.get(bad) is None and store.delete(bad) is False
    with pytest.raises(StoreError, match="avatar id"):
        store.put(make_avatar("../escape"))


def test_corrupt_entries_are_skipped_not_fatal(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for index, name in enumerate(["good", "truncated", "garbled", "missing"]):
        store.put(make_avatar(name, index))
    store.close()

    files = tmp_path / "avatars"
    data = (files / "truncated.npz").read_bytes()
    (files / "truncated.npz").write_bytes(data[: len(data) // 2])
    garbled = bytearray((files / "garbled.npz").read_bytes())
    garbled[-200:-100] = b"\x00" * 100
    (files / "garbled.npz").write_bytes(bytes(garbled))
    (files / "missing.npz").unlink()
    (files / "stray.npz").write_bytes(b"not an npz")
    (files / ".good.npz.123.456.tmp").write_bytes(b"half a write")

    reopened = LocalStore(tmp_path)
    assert [m.id for m in reopened.list()] == ["good", "garbled"]  # same size: found on read
    assert reopened.get("good") is not None
    assert reopened.get("garbled") is None  # hash mismatch, reported and skipped
    assert reopened.get("truncated") is None and reopened.get("missing") is None
    assert set(reopened.corrupt) == {"truncated", "garbled", "missing", "stray"}
    assert "expected" in reopened.corrupt["truncated"]
    assert [m.id for m in reopened.list()] == ["good"]
    assert not list(files.glob(".*.tmp"))

    # registering again under a damaged id heals it
    reopened.put(make_avatar("missing", 9))
    assert reopened.get("missing") is not None


def test_unreadable_index_is_rebuilt_from_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put(make_avatar("one", 1))
    store.put(make_avatar("two", 2))
    store.close()
    (tmp_path / "avatars.sqlite").write_bytes(b"this is not a database" * 100)

    reopened = LocalStore(tmp_path)
    assert sorted(m.id for m in reopened.list()) == ["one", "two"]
    assert_same(reopened.get("two"), make_avatar("two", 2))
    assert list(tmp_path.glob("avatars.sqlite.corrupt-*"))


def test_orphan_file_from_an_interrupted_put_is_indexed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put(make_avatar("orphan", 3))
    db = sqlite3.connect(tmp_path / "avatars.sqlite")
    db.execute("DELETE FROM avatars")
    db.commit()
    db.close()
    store.close()

    assert_same(LocalStore(tmp_path).get("orphan"), make_avatar("orphan", 3))


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path)
    store.put(make_avatar("keep", 1))

    # a failure in the middle of writing the replacement keeps the old avatar intact
    import server.store.local as local

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(local.os, "replace", failing_replace)
    with pytest.raises(StoreError, match="disk full"):
        store.put(make_avatar("keep", 2))
    monkeypatch.undo()
    assert_same(store.get("keep"), make_avatar("keep", 1))
    assert sorted(p.name for p in (tmp_path / "avatars").iterdir()) == ["keep.npz"]


def test_cache_is_bounded_and_invalidated(tmp_path: Path) -> None:
    cache = CachedStore(LocalStore(tmp_path), capacity=2)
    for index, name in enumerate(["a", "b", "c"]):
        cache.put(make_avatar(name, index))
    assert cache.cached_ids() == ["b", "c"]

    cache.get("a")  # a miss: loaded from disk, evicts the least recent
    assert cache.cached_ids() == ["c", "a"]
    hits = cache.hits
    cache.get("a")
    assert cache.hits == hits + 1

    assert cache.delete("a") is True
    assert "a" not in cache.cached_ids()
    assert cache.get("a") is None
    assert cache.health()["cached"] == 1
