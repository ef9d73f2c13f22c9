"""The embedded avatar store: one .npz file per avatar plus a SQLite index, under one folder.

Layout of the folder:

    avatars.sqlite        index: id, created, owner, metadata JSON, file size, sha256
    avatars/<id>.npz      texture, params and a copy of the metadata (self-describing)

Writes are atomic: the file is written to a temporary name, flushed and fsynced, then
renamed over its final name; the index row is committed after the file is in place.
Start-up never fails because of one avatar: a row whose file is missing, has the wrong
size or unreadable metadata is reported (log + `health()["corrupt"]`) and skipped; a file
without a row (a crash between the two steps) is indexed again; an unreadable index is
moved aside and rebuilt from the files. Deleting removes the file and the row; SQLite's
secure_delete overwrites the row's bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.store.base import Avatar, AvatarMeta, AvatarStore, StoreError, valid_avatar_id

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS avatars (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    owner TEXT,
    meta TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL
)
"""


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; not every platform allows opening a folder
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def pack_avatar(avatar: Avatar) -> bytes:
    """The .npz bytes of an avatar (no pickles: metadata as UTF-8 JSON bytes)."""
    buffer = io.BytesIO()
    meta = np.frombuffer(avatar.meta.to_json().encode(), dtype=np.uint8)
    np.savez(buffer, texture=avatar.texture, params=avatar.params, meta=meta)
    return buffer.getvalue()


def unpack_avatar(data: bytes) -> Avatar:
    """Inverse of pack_avatar; StoreError when the bytes are not a valid avatar."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            meta = AvatarMeta.from_json(bytes(arrays["meta"]).decode())
            avatar = Avatar(meta=meta, texture=arrays["texture"], params=arrays["params"])
    except StoreError:
        raise
    except Exception as error:  # numpy/zipfile raise many kinds on damaged files
        raise StoreError(f"unreadable avatar file: {type(error).__name__}: {error}") from error
    avatar.check()
    return avatar


class LocalStore(AvatarStore):
    """Files + SQLite under `root`; safe to share between threads of one process."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files = self.root / "avatars"
        self.index_path = self.root / "avatars.sqlite"
        self.files.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.corrupt: dict[str, str] = {}  # id -> why it was skipped

        self._db = self._open_index()
        self._scan()

    # ------------------------------------------------------------ start-up

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.index_path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA secure_delete = ON")
        db.execute("PRAGMA journal_mode = DELETE")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(SCHEMA)
        db.execute("SELECT count(*) FROM avatars").fetchone()
        return db

    def _open_index(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as error:
            aside = self.index_path.with_name(f"avatars.sqlite.corrupt-{int(time.time())}")
            logger.error(
                "avatar index %s is unreadable (%s); moved to %s and rebuilt from the files",
                self.index_path, error, aside.name,
            )
            os.replace(self.index_path, aside)
            return self._connect()

    def _scan(self) -> None:
        """Check every row against its file; index orphan files; drop stale temp files."""
        for tmp in self.files.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

        rows = self._db.execute("SELECT id, meta, nbytes FROM avatars").fetchall()
        indexed: set[str] = set()
        for avatar_id, meta_json, nbytes in rows:
            indexed.add(avatar_id)
            reason = self._row_problem(avatar_id, meta_json, nbytes)
            if reason is not None:
                self.corrupt[avatar_id] = reason
                logger.warning("avatar %s skipped: %s", avatar_id, reason)

        for path in sorted(self.files.glob("*.npz")):
            if path.stem in indexed:
                continue
            try:
                data = path.read_bytes()
                avatar = unpack_avatar(data)
                if avatar.id != path.stem:
                    raise StoreError(f"file holds avatar {avatar.id!r}")
            except (OSError, StoreError) as error:
                self.corrupt[path.stem] = f"unindexed file {path.name} unreadable: {error}"
                logger.warning("avatar file %s skipped: %s", path.name, error)
                continue
            self._insert(avatar.meta, data)
            logger.info("avatar %s re-indexed from %s", avatar.id, path.name)

        logger.info(
            "avatar store %s: %d avatars, %d skipped as damaged",
            self.root, self._count_readable(), len(self.corrupt),
        )

    def _row_problem(self, avatar_id: str, meta_json: str, nbytes: int) -> str | None:
        try:
            meta = AvatarMeta.from_json(meta_json)
        except StoreError as error:
            return str(error)
        if meta.id != avatar_id:
            return f"row metadata names avatar {meta.id!r}"
        path = self._path(avatar_id)
        if not path.exists():
            return f"file {path.name} is missing"
        if path.stat().st_size != nbytes:
            return f"file {path.name} has {path.stat().st_size} bytes, expected {nbytes}"
        return None

    # ------------------------------------------------------------ helpers

    def _path(self, avatar_id: str) -> Path:
        return self.files / f"{avatar_id}.npz"

    def _count_readable(self) -> int:
        with self._lock:
            ids = [row[0] for row in self._db.execute("SELECT id FROM avatars")]
        return sum(1 for avatar_id in ids if avatar_id not in self.corrupt)

    def _insert(self, meta: AvatarMeta, data: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO avatars (id, created, owner, meta, nbytes, sha256) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (meta.id, meta.created, meta.owner, meta.to_json(), len(data),
                 hashlib.sha256(data).hexdigest()),
            )

    def _mark_corrupt(self, avatar_id: str, reason: str) -> None:
        if avatar_id not in self.corrupt:
            logger.warning("avatar %s skipped: %s", avatar_id, reason)
        self.corrupt[avatar_id] = reason

    # ------------------------------------------------------------ interface

    def put(self, avatar: Avatar) -> None:
        if not valid_avatar_id(avatar.id):
            raise StoreError(f"avatar id: expected [A-Za-z0-9_-]{{1,64}}, got {avatar.id!r}")
        avatar.check()
        data = pack_avatar(avatar)
        try:
            write_atomic(self._path(avatar.id), data)
            self._insert(avatar.meta, data)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot store avatar {avatar.id}: {error}") from error
        self.corrupt.pop(avatar.id, None)

    def get(self, avatar_id: str) -> Avatar | None:
        if not valid_avatar_id(avatar_id) or avatar_id in self.corrupt:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT sha256 FROM avatars WHERE id = ?", (avatar_id,)
            ).fetchone()
        if row is None:
            return None

        try:
            data = self._path(avatar_id).read_bytes()
        except OSError as error:
            self._mark_corrupt(avatar_id, f"cannot read its file: {error}")
            return None
        if hashlib.sha256(data).hexdigest() != row[0]:
            self._mark_corrupt(avatar_id, "file content does not match its recorded sha256")
            return None
        try:
            return unpack_avatar(data)
        except StoreError as error:
            self._mark_corrupt(avatar_id, str(error))
            return None

    def get_meta(self, avatar_id: str) -> AvatarMeta | None:
        if not valid_avatar_id(avatar_id) or avatar_id in self.corrupt:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT meta FROM avatars WHERE id = ?", (avatar_id,)
            ).fetchone()
        if row is None:
            return None
        try:
            return AvatarMeta.from_json(row[0])
        except StoreError as error:
            self._mark_corrupt(avatar_id, str(error))
            return None

    def list(self, owner: str | None = None) -> list[AvatarMeta]:
        with self._lock:
            if owner is None:
                cursor = self._db.execute("SELECT id, meta FROM avatars ORDER BY created")
            else:
                cursor = self._db.execute(
                    "SELECT id, meta FROM avatars WHERE owner = ? ORDER BY created", (owner,)
                )
            rows = cursor.fetchall()

        metas = []
        for avatar_id, meta_json in rows:
            if avatar_id in self.corrupt:
                continue
            try:
                metas.append(AvatarMeta.from_json(meta_json))
            except StoreError as error:
                self._mark_corrupt(avatar_id, str(error))
        return metas

    def count(self, owner: str | None = None) -> int:
        with self._lock:
            if owner is None:
                row = self._db.execute("SELECT count(*) FROM avatars").fetchone()
            else:
                row = self._db.execute(
                    "SELECT count(*) FROM avatars WHERE owner = ?", (owner,)
                ).fetchone()
        return int(row[0])

    def version(self, avatar_id: str) -> str | None:
        if not valid_avatar_id(avatar_id):
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT sha256 FROM avatars WHERE id = ?", (avatar_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def delete(self, avatar_id: str) -> bool:
        if not valid_avatar_id(avatar_id):
            return False
        path = self._path(avatar_id)
        with self._lock:
            cursor = self._db.execute("DELETE FROM avatars WHERE id = ?", (avatar_id,))
            existed = cursor.rowcount > 0
        existed = existed or path.exists()
        path.unlink(missing_ok=True)
        _fsync_dir(self.files)
        self.corrupt.pop(avatar_id, None)
        return existed

    def health(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "avatars": self._count_readable(),
            "corrupt": len(self.corrupt),
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

