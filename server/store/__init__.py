"""Avatar stores: the interface, the embedded files + SQLite store, the hot cache."""

from server.store.base import Avatar, AvatarMeta, AvatarStore, CachedStore, StoreError

__all__ = ["Avatar", "AvatarMeta", "AvatarStore", "CachedStore", "StoreError"]
