"""The avatar store interface, the avatar record, and a bounded in-memory cache in front.

An avatar is what registration leaves behind: its texture [3, H, W], the flat Inference
Generator parameters [P], and metadata (source pose, crop box, timings). Stores keep
avatars across restarts; `CachedStore` keeps the hot ones in memory for the streams.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

AVATAR_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_avatar_id(avatar_id: str) -> bool:
    """Ids are short URL-safe tokens; anything else is never looked up."""
    return bool(AVATAR_ID_PATTERN.match(avatar_id))


class StoreError(Exception):
    """The store cannot do what was asked (I/O failure, bad record); the message says why."""


@dataclass(frozen=True)
class AvatarMeta:
    """Everything about an avatar except its tensors."""

    id: str
    created: float  # unix seconds
    image_size: int  # frames are image_size x image_size
    preset: str  # model preset of the weights that registered it
    weights_sha256: str  # checkpoint hash of those weights
    source_pose: tuple[float, ...]  # [136] normalised landmarks of the photo
    crop: tuple[float, float, float]  # (cx, cy, side) in photo pixels
    photo_size: tuple[int, int]  # (width, height) of the uploaded photo
    num_faces: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    owner: str | None = None  # the API key that made it, once keys exist

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AvatarMeta:
        """Parse and check a stored record; StoreError names the first bad field."""
        try:
            raw = json.loads(text)
            meta = cls(
                id=str(raw["id"]),
                created=float(raw["created"]),
                image_size=int(raw["image_size"]),
                preset=str(raw["preset"]),
                weights_sha256=str(raw["weights_sha256"]),
                source_pose=tuple(float(v) for v in raw["source_pose"]),
                crop=(float(raw["crop"][0]), float(raw["crop"][1]), float(raw["crop"][2])),
                photo_size=(int(raw["photo_size"][0]), int(raw["photo_size"][1])),
                num_faces=int(raw["num_faces"]),
                timings_ms={str(k): float(v) for k, v in raw.get("timings_ms", {}).items()},
                owner=None if raw.get("owner") is None else str(raw["owner"]),
            )
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise StoreError(f"bad avatar metadata: {type(error).__name__}: {error}") from error
        if len(meta.source_pose) != 136:
            raise StoreError(f"bad avatar metadata: source_pose has {len(meta.source_pose)} "
                             "values, expected 136")
        return meta


@dataclass(frozen=True)
class Avatar:
    """A registered avatar: metadata and the state every frame needs."""

    meta: AvatarMeta
    texture: np.ndarray  # [3, H, W] float32
    params: np.ndarray  # [P] float32

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def source_pose(self) -> np.ndarray:
        return np.asarray(self.meta.source_pose, dtype=np.float32)  # [136]

    @property
    def nbytes(self) -> int:
        return int(self.texture.nbytes + self.params.nbytes)

    def check(self) -> None:
        """Shapes and values consistent; StoreError otherwise."""
        size = self.meta.image_size
        if self.texture.shape != (3, size, size) or self.texture.dtype != np.float32:
            raise StoreError(f"avatar {self.id}: texture {self.texture.dtype} "
                             f"{self.texture.shape}, expected float32 (3, {size}, {size})")
        if self.params.ndim != 1 or self.params.dtype != np.float32:
            raise StoreError(f"avatar {self.id}: params {self.params.dtype} "
                             f"{self.params.shape}, expected float32 [P]")
        if not (np.isfinite(self.texture).all() and np.isfinite(self.params).all()):
            raise StoreError(f"avatar {self.id}: tensors hold NaN or Inf")


class AvatarStore(ABC):
    """Where avatars live. Methods are blocking; async code calls them in a thread."""

    kind: str = "abstract"
    # True when other processes write the same avatars (Redis): cached copies are checked
    # against `version` before use
    shared: bool = False

    @abstractmethod
    def put(self, avatar: Avatar) -> None:
        """Store an avatar durably (replaces one with the same id)."""

    @abstractmethod
    def get(self, avatar_id: str) -> Avatar | None:
        """The avatar, or None when unknown (or damaged: reported, then treated as gone)."""

    @abstractmethod
    def get_meta(self, avatar_id: str) -> AvatarMeta | None:
        """Metadata only, without reading the tensors."""

    @abstractmethod
    def list(self, owner: str | None = None) -> list[AvatarMeta]:
        """Every readable avatar (of `owner` when given), oldest first."""

    @abstractmethod
    def delete(self, avatar_id: str) -> bool:
        """Remove every byte of an avatar; False when it did not exist."""

    def exists(self, avatar_id: str) -> bool:
        return self.get_meta(avatar_id) is not None

    def count(self, owner: str | None = None) -> int:
        """How many avatars (of `owner` when given)."""
        return len(self.list(owner))

    def version(self, avatar_id: str) -> str | None:
        """A token that changes whenever the avatar is replaced; None when unknown."""
        meta = self.get_meta(avatar_id)
        return None if meta is None else f"{meta.created!r}"

    def health(self) -> dict[str, Any]:
        """What /readyz shows about the store."""
        return {"kind": self.kind}

    def close(self) -> None:  # noqa: B027 - a store without resources needs no close
        """Release files and connections."""


class CachedStore(AvatarStore):
    """A bounded LRU of hot avatars in front of another store (one per process).

    In front of a shared store (Redis) a cached avatar is used only while the store still
    holds the same version of it: one small read instead of the whole avatar, and an
    avatar deleted or replaced through another replica is never served from here.
    """

    def __init__(self, inner: AvatarStore, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity: expected >= 1, got {capacity}")
        self.inner = inner
        self.capacity = capacity
        self.kind = inner.kind
        self.shared = inner.shared
        self._avatars: OrderedDict[str, tuple[Avatar, str | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _remember(self, avatar: Avatar, version: str | None) -> None:
        with self._lock:
            self._avatars[avatar.id] = (avatar, version)
            self._avatars.move_to_end(avatar.id)
            while len(self._avatars) > self.capacity:
                self._avatars.popitem(last=False)

    def put(self, avatar: Avatar) -> None:
        self.inner.put(avatar)
        self._remember(avatar, self.inner.version(avatar.id) if self.shared else None)

    def _cached(self, avatar_id: str) -> Avatar | None:
        with self._lock:
            entry = self._avatars.get(avatar_id)
        if entry is None:
            return None
        avatar, version = entry
        if self.shared and self.inner.version(avatar_id) != version:
            self.invalidate(avatar_id)
            return None
        with self._lock:
            if avatar_id in self._avatars:
                self._avatars.move_to_end(avatar_id)
        return avatar

    def get(self, avatar_id: str) -> Avatar | None:
        avatar = self._cached(avatar_id)
        if avatar is not None:
            self.hits += 1
            return avatar
        self.misses += 1

        # the version first: a replacement in between only costs one more read later
        version = self.inner.version(avatar_id) if self.shared else None
        avatar = self.inner.get(avatar_id)
        if avatar is not None:
            self._remember(avatar, version)
        return avatar

    def get_meta(self, avatar_id: str) -> AvatarMeta | None:
        if self.shared:
            return self.inner.get_meta(avatar_id)
        with self._lock:
            entry = self._avatars.get(avatar_id)
        return entry[0].meta if entry is not None else self.inner.get_meta(avatar_id)

    def version(self, avatar_id: str) -> str | None:
        return self.inner.version(avatar_id)

    def count(self, owner: str | None = None) -> int:
        return self.inner.count(owner)

    def list(self, owner: str | None = None) -> list[AvatarMeta]:
        return self.inner.list(owner)

    def delete(self, avatar_id: str) -> bool:
        with self._lock:
            self._avatars.pop(avatar_id, None)
        return self.inner.delete(avatar_id)

    def invalidate(self, avatar_id: str) -> None:
        """Forget a cached avatar (another replica deleted or replaced it)."""
        with self._lock:
            self._avatars.pop(avatar_id, None)

    def cached_ids(self) -> builtins.list[str]:
        with self._lock:
            return list(self._avatars)

    def health(self) -> dict[str, Any]:
        with self._lock:
            cached = len(self._avatars)
        return {**self.inner.health(), "cached": cached, "cache_capacity": self.capacity}

    def close(self) -> None:
        with self._lock:
            self._avatars.clear()
        self.inner.close()
