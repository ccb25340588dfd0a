"""A personalization run: partition bookkeeping, reduce + publish, and reading edits back.

Layout under the store root (DESIGN.md section 3):

    runs/<run_id>/rejects.jsonl                 invalid input records, one reason each
    runs/<run_id>/profiles/part-K.parquet       map output (see chameleon.stages)
    runs/<run_id>/failures/part-K.jsonl         users that failed inside the map stage
    runs/<run_id>/pairs/part-K.parquet          map output; written last = partition K is complete
    runs/<run_id>/users/shard-S.safetensors     per-user θP, θN, μ, ranks, CCS losses (1024 users a shard)
    runs/<run_id>/groups/<group_id>.safetensors one group edit each
    runs/<run_id>/groups/centroids.safetensors  history centroids (assign unseen users)
    runs/<run_id>/assignments.parquet           user_id → group_id, distance, how assigned
    runs/<run_id>/manifest.json                 written last; then <root>/latest
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import torch

from chameleon import prompts
from chameleon import subspace as ss
from chameleon.artifacts import ModelFingerprint, RunReader, RunWriter
from chameleon.config import ChameleonConfig
from chameleon.edit import Edit
from chameleon.schema import Reject, UserRecord
from chameleon.stages import (
    Grouping,
    UnitData,
    UserReduce,
    group_users,
    reduce_groups,
    reduce_users,
    tables_to_units,
    unit_edit,
)

USER_SHARD_SIZE = 1024
FORMAT = "chameleon-run/1"


def part_keys(k: int) -> dict[str, str]:
    return {
        "pairs": f"pairs/part-{k:05d}.parquet",
        "profiles": f"profiles/part-{k:05d}.parquet",
        "failures": f"failures/part-{k:05d}.jsonl",
    }


def partition_users(users: Sequence[UserRecord], size: int) -> list[list[UserRecord]]:
    """Fixed partitions in input order: a rerun maps the same users to the same partition ids."""
    return [list(users[i : i + size]) for i in range(0, len(users), size)]


def write_partition(writer: RunWriter, k: int, pairs: pa.Table, profiles: pa.Table, failures: list[dict]) -> None:
    """Write a finished partition; the pairs file goes last and marks it complete."""
    keys = part_keys(k)
    writer.put_parquet(keys["profiles"], profiles)
    writer.put_jsonl(keys["failures"], failures)
    writer.put_parquet(keys["pairs"], pairs)


def partition_done(writer: RunWriter, k: int) -> bool:
    """True when partition k was completed by an earlier (interrupted) attempt; adopts its files."""
    keys = part_keys(k)
    if not all(writer.exists(key) for key in keys.values()):
        return False
    for key in keys.values():
        writer.record_existing(key)
    return True


def write_rejects(writer: RunWriter, rejects: Sequence[Reject]) -> None:
    rows = [json.loads(json.dumps(r.to_dict(), default=repr)) for r in rejects]
    writer.put_jsonl("rejects.jsonl", rows)


# ---------------------------------------------------------------------------------------------


def _read_partitions(writer: RunWriter, n_partitions: int) -> tuple[pa.Table, pa.Table, list[dict]]:
    store = writer.run_store
    pairs, profiles, failures = [], [], []
    for k in range(n_partitions):
        keys = part_keys(k)
        p = store.get_parquet(keys["pairs"])
        if p.num_rows:
            pairs.append(p)
        q = store.get_parquet(keys["profiles"])
        if q.num_rows:
            profiles.append(q)
        text = store.get_text(keys["failures"])
        failures += [json.loads(line) for line in text.splitlines() if line.strip()]
    if not pairs:
        raise RuntimeError("the map stage produced no pairs for any user (see failures/ in the run)")
    return pa.concat_tables(pairs), pa.concat_tables(profiles), failures


def _per_user_layers(t: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Row i of t [U, L, ...] at its own layers chosen[i] -> [U, n, ...]."""
    return torch.stack([t[i][chosen[i]] for i in range(len(chosen))]).contiguous()


def _user_shards(data: UnitData, red: UserReduce, layers: Sequence[int]) -> list[tuple[str, dict, list[str]]]:
    out = []
    for s, start in enumerate(range(0, len(data.user_ids), USER_SHARD_SIZE)):
        sl = slice(start, start + USER_SHARD_SIZE)
        chosen = red.chosen[sl]
        sub = red.sub
        tensors = {
            "layers": torch.tensor(layers, dtype=torch.int64)[chosen],
            "theta_p": _per_user_layers(sub.theta_p[sl], chosen),
            "theta_n": _per_user_layers(sub.theta_n[sl], chosen),
            "mean": _per_user_layers(sub.mean[sl], chosen),
            "rank": _per_user_layers(sub.rank[sl], chosen),
            "ccs_loss": sub.ccs_loss[sl].contiguous(),
            "has_edit": red.has_edit[sl].to(torch.uint8),
            "n_pairs_kept": red.keep[sl].sum(1),
        }
        out.append((f"users/shard-{s:05d}.safetensors", tensors, data.user_ids[sl]))
    return out


def reduce_and_publish(
    writer: RunWriter,
    cfg: ChameleonConfig,
    layers: Sequence[int],
    fingerprint: ModelFingerprint,
    model_id: str,
    n_partitions: int,
    counts: dict[str, int],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Reduce every partition of the run, group, and publish; returns the manifest."""
    t0 = time.perf_counter()
    pairs, profiles, failures = _read_partitions(writer, n_partitions)
    data = tables_to_units(pairs, profiles, len(layers))
    red = reduce_users(data, cfg.subspace, layers)
    timings["reduce_users_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    grouping = group_users(data, red, cfg)
    gsub, gchosen = reduce_groups(data, red, grouping, cfg.subspace, layers)
    timings["reduce_groups_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    site = cfg.subspace.site
    for key, tensors, ids in _user_shards(data, red, layers):
        writer.put_safetensors(key, tensors, {"user_ids": json.dumps(ids)})
    groups_meta = []
    for j, gid in enumerate(grouping.group_ids):
        edit = unit_edit(gsub, j, gchosen, layers, site)
        tensors = {**edit.to_tensors(), "rank": gsub.rank[j, gchosen[j]], "ccs_loss": gsub.ccs_loss[j]}
        meta = {"group_id": gid, "n_users": str(grouping.sizes[j]), "n_pairs": str(int(gsub.n_pairs[j]))}
        writer.put_safetensors(f"groups/{gid}.safetensors", tensors, meta)
        groups_meta.append({"group_id": gid, "n_users": grouping.sizes[j], "n_pairs": int(gsub.n_pairs[j]),
                            "layers": edit.layers, "rank": gsub.rank[j, gchosen[j]].tolist()})
    writer.put_safetensors(
        "groups/centroids.safetensors",
        {"history_centroids": grouping.history_centroids.contiguous()},
        {"group_ids": json.dumps(grouping.group_ids)},
    )
    writer.put_parquet("assignments.parquet", assignments_table(data, red, grouping))
    timings["publish_s"] = time.perf_counter() - t2

    counts = {
        **counts,
        "users_mapped": len(data.user_ids),
        "users_failed": len(failures),
        "users_with_edit": int(red.has_edit.sum()),
        "groups": len(grouping.group_ids),
        "pairs": int(data.mask.sum()),
        "pairs_kept": int(red.keep.sum()),
    }
    manifest = {
        "format": FORMAT,
        "run_id": writer.run_id,
        "model": {"id": model_id, "revision": cfg.model.revision, "fingerprint": asdict(fingerprint)},
        "hidden_size": fingerprint.hidden_size,
        "captured_layers": list(layers),
        "site": site,
        "max_rank": cfg.subspace.max_rank,
        "edit": cfg.edit.model_dump(),
        "method": {k: v for k, v in cfg.subspace.model_dump().items()},
        "prompt_version": prompts.PROMPT_VERSION,
        "seeds": {"synth": cfg.synth.seed, "subspace": cfg.subspace.seed, "groups": cfg.groups.seed},
        "groups": groups_meta,
        "user_shards": [k for k, _, _ in _user_shards_index(len(data.user_ids))],
        "counts": counts,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "config": cfg.model_dump(),
    }
    return writer.commit(manifest)


def _user_shards_index(n_users: int) -> list[tuple[str, int, int]]:
    return [
        (f"users/shard-{s:05d}.safetensors", start, min(n_users, start + USER_SHARD_SIZE))
        for s, start in enumerate(range(0, n_users, USER_SHARD_SIZE))
    ]


def assignments_table(data: UnitData, red: UserReduce, grouping: Grouping) -> pa.Table:
    n = len(data.user_ids)
    return pa.table(
        {
            "user_id": pa.array(data.user_ids, pa.string()),
            "group_id": pa.array([grouping.group_ids[i] for i in grouping.labels.tolist()], pa.string()),
            "distance": pa.array(grouping.distance.tolist(), pa.float32()),
            "assigned_by": pa.array(grouping.assigned_by, pa.string()),
            "user_shard": pa.array([i // USER_SHARD_SIZE for i in range(n)], pa.int32()),
            "user_row": pa.array([i % USER_SHARD_SIZE for i in range(n)], pa.int32()),
            "has_user_edit": pa.array(red.has_edit.tolist(), pa.bool_()),
            "n_pairs_kept": pa.array(red.keep.sum(1).tolist(), pa.int32()),
        }
    )


# ---------------------------------------------------------------------------------------------
# Reading a published run


class PublishedRun:
    """Typed access to a committed run's edits (checksums verified on every read)."""

    def __init__(self, reader: RunReader) -> None:
        self.reader = reader
        self.manifest = reader.manifest
        self.run_id = self.manifest["run_id"]
        self.site = self.manifest["site"]
        self._assign: dict[str, dict] | None = None

    @property
    def group_ids(self) -> list[str]:
        return [g["group_id"] for g in self.manifest["groups"]]

    def group_edit(self, group_id: str) -> Edit:
        if group_id not in self.group_ids:
            raise KeyError(f"run {self.run_id} has no group {group_id!r}")
        tensors, _ = self.reader.get_safetensors(f"groups/{group_id}.safetensors")
        return Edit.from_tensors(tensors, site=self.site)

    def assignments(self) -> dict[str, dict]:
        if self._assign is None:
            rows = self.reader.get_parquet("assignments.parquet").to_pylist()
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
        tensors, _ = self.reader.get_safetensors(f"users/shard-{row['user_shard']:05d}.safetensors")
        i = row["user_row"]
        return Edit(
            layers=tensors["layers"][i].tolist(),
            theta_p=tensors["theta_p"][i],
            theta_n=tensors["theta_n"][i],
            mean=tensors["mean"][i],
            site=self.site,
        )

    def assign_unseen(self, history_embedding: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Nearest group of each row of history embeddings [N, d] (users the run never saw)."""
        tensors, meta = self.reader.get_safetensors("groups/centroids.safetensors")
        ids = json.loads(meta["group_ids"])
        idx, dist = ss.nearest_group(history_embedding, tensors["history_centroids"])
        return [ids[i] for i in idx.tolist()], dist
