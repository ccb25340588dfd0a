"""A committed run's edits, typed: group edits, user edits, assignments, unseen-user assignment.

Every read goes through `RunReader` (checksums verified). Group edits are read once per group
and user shards once per shard, then kept: resolving edits for many users costs one read per
distinct file, not one per user.

The edit a user is served is their group's (or own) edit plus their **marker part** when the run
has marker parts (`edit.markers`, `core.marker_steering`): the markers the user's history shows
(`assignments.markers`) select directions of `markers.safetensors`. `served_edit` composes it, so
the evaluation and serving answer with the same row.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from chameleon.core import subspace
from chameleon.core.edit import Edit
from chameleon.core.marker_steering import MarkerParts, with_marker_part
from chameleon.data.artifacts import RunReader
from chameleon.data.layout import ASSIGNMENTS, CENTROIDS, MARKER_DIRECTIONS, group_key, user_shard_key
from chameleon.data.user_shards import user_shard_edit

LEVELS = ("none", "group", "user")
GROUP_PARTS = ("global_steer", "group_steer")
"""Tensors of a residual-composition group file that hold its composed row's parts."""
"""Which edit a user gets: the base model, the user's group edit, or the user's own edit."""


class PublishedRun:
    """Typed access to a committed run's edits (checksums verified on every read)."""

    def __init__(self, reader: RunReader, group_cache_size: int | None = None) -> None:
        """`group_cache_size`: group edits kept in memory (least recently used dropped first;
        None = all, for jobs that read each group once)."""
        self.reader = reader
        self.group_cache_size = group_cache_size
        self.manifest = reader.manifest
        self.run_id = self.manifest.run_id
        self.site = self.manifest.site
        self._assign: dict[str, dict] | None = None
        self._groups: OrderedDict[str, Edit] = OrderedDict()
        self._group_parts: dict[str, dict[str, torch.Tensor]] = {}  # read with the edit, evicted with it
        self._groups_lock = threading.Lock()  # serving loads groups from several threads
        self._shards: dict[int, dict[str, Any]] = {}
        self._marker_parts: MarkerParts | None = None
        # (group, markers) -> served row; evicted with its group's edit.
        self._composed: dict[tuple[str, tuple[str, ...]], Edit] = {}

    @property
    def group_ids(self) -> list[str]:
        return self.manifest.group_ids

    def group_edit(self, group_id: str) -> Edit:
        """The group's edit; one Edit object per group while it stays cached, so callers can
        de-duplicate by identity."""
        with self._groups_lock:
            edit = self._groups.get(group_id)
            if edit is not None:
                self._groups.move_to_end(group_id)
                return edit
        if group_id not in self.group_ids:
            raise KeyError(f"run {self.run_id} has no group {group_id!r}")
        tensors, _ = self.reader.get_safetensors(group_key(group_id))
        edit = Edit.from_tensors(tensors, site=self.site)
        parts = {k: tensors[k] for k in GROUP_PARTS if k in tensors}
        with self._groups_lock:
            edit = self._groups.setdefault(group_id, edit)
            self._group_parts.setdefault(group_id, parts)
            if self.group_cache_size is not None and len(self._groups) > self.group_cache_size:
                evicted, _ = self._groups.popitem(last=False)
                self._group_parts.pop(evicted, None)
                for key in [k for k in self._composed if k[0] == evicted]:  # its rows with marker parts
                    del self._composed[key]
        return edit

    def group_parts(self, group_id: str) -> dict[str, torch.Tensor]:
        """Residual composition: the parts of the group's composed row, `global_steer` and
        `group_steer` ([1, d] each, at the edit's layer); empty for runs without parts."""
        self.group_edit(group_id)  # validates the id and loads the parts with the edit (one read)
        with self._groups_lock:
            parts = self._group_parts.get(group_id)
        if parts is None:  # evicted meanwhile by another thread's load
            tensors, _ = self.reader.get_safetensors(group_key(group_id))
            parts = {k: tensors[k] for k in GROUP_PARTS if k in tensors}
        return parts

    def user_part(self, user_id: str) -> torch.Tensor | None:
        """Residual composition: the user's own residual ([1, d]) inside its composed row; None for
        users without an own edit or runs without parts."""
        row = self.assignments().get(user_id)
        if row is None or not row["has_user_edit"]:
            return None
        self.user_edit(user_id)  # loads the shard
        tensors = self._shards[row["user_shard"]]
        return tensors["user_steer"][row["user_row"]] if "user_steer" in tensors else None

    def assignments(self) -> dict[str, dict]:
        if self._assign is None:
            rows = self.reader.get_parquet(ASSIGNMENTS).to_pylist()
            self._assign = {r["user_id"]: r for r in rows}
        return self._assign

    def user_group(self, user_id: str) -> str | None:
        row = self.assignments().get(user_id)
        return row["group_id"] if row else None

    def user_edit(self, user_id: str) -> Edit | None:
        """The user's own edit, or None when the user has none (too few pairs) or is unknown."""
        row = self.assignments().get(user_id)
        if row is None or not row["has_user_edit"]:
            return None
        shard = row["user_shard"]
        if shard not in self._shards:
            self._shards[shard], _ = self.reader.get_safetensors(user_shard_key(shard))
        return user_shard_edit(self._shards[shard], row["user_row"], self.site)

    def user_markers(self, user_id: str) -> tuple[str, ...]:
        """The markers the user's marker part adds (empty: none, an unknown user, or a run
        without marker parts)."""
        if not self.manifest.marker_parts:
            return ()
        row = self.assignments().get(user_id)
        return tuple(row.get("markers") or ()) if row else ()

    def marker_parts(self) -> MarkerParts | None:
        """The run's marker directions (read once), or None for a run without marker parts."""
        spec = self.manifest.marker_parts
        if not spec:
            return None
        if self._marker_parts is None:
            tensors, meta = self.reader.get_safetensors(MARKER_DIRECTIONS)
            self._marker_parts = MarkerParts(
                layers=[int(x) for x in json.loads(meta["layers"])],
                directions={m: tensors[m] for m in spec["markers"]},
                n_queries=int(spec["n_queries"]),
            )
        return self._marker_parts

    def with_markers(self, edit: Edit | None, markers: Sequence[str]) -> Edit | None:
        """`edit` plus the marker part of `markers` (`edit` itself when there are none)."""
        parts = self.marker_parts() if markers else None
        if parts is None:
            return edit
        return with_marker_part(edit, parts.layers, parts.steer(markers, self.manifest.edit.marker_strength))

    def served_edit(self, group_id: str, markers: Sequence[str] = ()) -> Edit:
        """The row a user of `group_id` whose marker part adds `markers` is served (one Edit
        object per combination while its group's edit stays cached)."""
        if not markers:
            return self.group_edit(group_id)
        key = (group_id, tuple(markers))
        with self._groups_lock:
            edit = self._composed.get(key)
        if edit is None:
            edit = self.with_markers(self.group_edit(group_id), markers)
            with self._groups_lock:
                if group_id in self._groups:  # not evicted meanwhile by another thread's load
                    edit = self._composed.setdefault(key, edit)
        return edit

    def edit_for(self, user_id: str, level: str, group_id: str | None = None) -> Edit | None:
        """The edit a user gets at `level` (None = base model), with the user's marker part.
        `group_id` overrides the assignment."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if level == "none":
            return None
        markers = self.user_markers(user_id)
        if level == "user":
            own = self.user_edit(user_id)
            return self.with_markers(own, markers) if own is not None else None
        gid = group_id or self.user_group(user_id)
        return self.served_edit(gid, markers) if gid else None

    def edits_for(
        self, user_ids: Sequence[str], level: str, group_ids: Sequence[str | None] | None = None
    ) -> list[Edit | None]:
        """`edit_for` of each user (rows of one group share one Edit object)."""
        return [self.edit_for(u, level, group_ids[i] if group_ids else None) for i, u in enumerate(user_ids)]

    def assign_unseen(self, history_embedding: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Nearest group of each row of history embeddings [N, d] (users the run never saw)."""
        tensors, meta = self.reader.get_safetensors(CENTROIDS)
        ids = json.loads(meta["group_ids"])
        idx, dist = subspace.nearest_group(history_embedding, tensors["history_centroids"])
        return [ids[i] for i in idx.tolist()], dist
