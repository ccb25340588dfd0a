"""The prediction cache: raw answers per (method, configuration, users), so an evaluation resumes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from chameleon.data.storage import LocalStore

__all__ = ["PredictionCache", "key_hash"]


def key_hash(key: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-able key (sorted keys; other objects by ``str``)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PredictionCache:
    """Raw answers per (method, configuration, users), one Parquet file each, under ``root``.

    A rerun with the same key reads the file instead of generating: an interrupted evaluation
    loses at most the method it was generating. Files are written through a :class:`LocalStore`
    (a unique temporary file renamed into place), so a reader never sees a partial file, even with
    two evaluations sharing the directory.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.store = LocalStore(self.root)

    def key(self, name: str, key: dict[str, Any]) -> str:
        """The file of ``name`` + ``key``, relative to ``root``."""
        return f"{name}-{key_hash(key)}.parquet"

    def path(self, name: str, key: dict[str, Any]) -> Path:
        return self.root / self.key(name, key)

    def get(self, name: str, key: dict[str, Any], user_ids: Sequence[str]) -> list[str] | None:
        """The cached answers of ``user_ids`` in that order, or None unless every one is cached."""
        k = self.key(name, key)
        if not self.store.exists(k):
            return None
        t = self.store.get_parquet(k)
        got = dict(zip(t.column("user_id").to_pylist(), t.column("raw").to_pylist(), strict=True))
        if not all(u in got for u in user_ids):
            return None
        return [got[u] for u in user_ids]

    def put(self, name: str, key: dict[str, Any], user_ids: Sequence[str], raw: Sequence[str]) -> Path:
        table = pa.table(
            {"user_id": pa.array(list(user_ids), pa.string()), "raw": pa.array(list(raw), pa.string())}
        )
        table = table.replace_schema_metadata({"key": json.dumps(key, sort_keys=True, default=str)})
        self.store.put_parquet(self.key(name, key), table)
        return self.path(name, key)

    def cached(
        self, name: str, key: dict[str, Any], user_ids: Sequence[str], produce: Callable[[], list[str]]
    ) -> tuple[list[str], bool]:
        """(raw answers, came from the cache)."""
        hit = self.get(name, key, user_ids)
        if hit is not None:
            return hit, True
        raw = produce()
        self.put(name, key, user_ids, raw)
        return raw, False
