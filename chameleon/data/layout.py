"""Where each file of a run lives, and the one reader of a run's map-stage partitions.

Logical paths (each writer stores them under its own `attempts/<attempt>/` folder; the manifest,
and a partition's done record, map them to their objects: `chameleon.data.artifacts`):

runs/<run_id>/job-spec.json                 what the run is made from (`job.spec`); fixed key
runs/<run_id>/parts/part-K.json             partition K is done: its user ids, its files' hashes
                                            and keys, the model that mapped it; fixed key
runs/<run_id>/rejects.jsonl                 invalid input records, one reason each (Ray driver:
                                            rejects/file-F.jsonl per input file, rejects/duplicates.jsonl)
runs/<run_id>/profiles/part-K.parquet       map output: per user, selected history, history embedding
runs/<run_id>/failures/part-K.jsonl         users that failed inside the map stage
runs/<run_id>/pairs/part-K.parquet          map output
runs/<run_id>/users/shard-S.safetensors     per-user θP, θN, μ, ranks, CCS losses (1024 users a shard)
runs/<run_id>/groups/<group_id>.safetensors one group edit each (nothing else lives in groups/)
runs/<run_id>/centroids.safetensors         history centroids of the groups (assign unseen users)
runs/<run_id>/markers.safetensors           the model's marker directions (`edit.markers`; no user's data
                                            but the held-out queries they are the mean over)
runs/<run_id>/assignments.parquet           user_id → group_id, distance, how assigned, shard row,
                                            the markers the user's part adds
runs/<run_id>/manifest.json                 written last; then <root>/latest
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from chameleon.data.artifacts import VerifiedFiles
from chameleon.data.ids import validate_id

USER_SHARD_SIZE = 1024
REJECTS = "rejects.jsonl"
ASSIGNMENTS = "assignments.parquet"
CENTROIDS = "centroids.safetensors"
CALIBRATION = "calibration.json"
MARKER_DIRECTIONS = "markers.safetensors"
JOB_SPEC = "job-spec.json"


def reject_files(names: Sequence[str]) -> list[str]:
    """The rejects files among a run's files: `rejects.jsonl` (the in-process driver) or
    `rejects/*.jsonl` (the Ray driver: one per input file, and `rejects/duplicates.jsonl`)."""
    return sorted(n for n in names if n == REJECTS or (n.startswith("rejects/") and n.endswith(".jsonl")))


@dataclass(frozen=True)
class PartKeys:
    """The three files of map partition K (its done record, `done_key(k)`, marks it complete)."""

    profiles: str
    failures: str
    pairs: str

    def all(self) -> tuple[str, str, str]:
        return (self.profiles, self.failures, self.pairs)


def part_keys(k: int) -> PartKeys:
    return PartKeys(
        profiles=f"profiles/part-{k:05d}.parquet",
        failures=f"failures/part-{k:05d}.jsonl",
        pairs=f"pairs/part-{k:05d}.parquet",
    )


def done_key(k: int) -> str:
    """The done record of partition K (outside any attempt folder: the newest one wins)."""
    return f"parts/part-{k:05d}.json"


def group_key(group_id: str) -> str:
    return f"groups/{validate_id(group_id, 'group id')}.safetensors"


def user_shard_key(shard: int) -> str:
    return f"users/shard-{shard:05d}.safetensors"


def user_shards(n_users: int) -> list[tuple[str, slice]]:
    """(key, rows) of each user shard for `n_users` users in published order."""
    return [
        (user_shard_key(s), slice(start, min(n_users, start + USER_SHARD_SIZE)))
        for s, start in enumerate(range(0, n_users, USER_SHARD_SIZE))
    ]


# -- Arrow: fixed-width float32 vector columns -------------------------------------------------


def vector_column(values: np.ndarray, width: int) -> pa.Array:
    """Rows of `values` ([N, width] or flat) as a FixedSizeList<float32> column."""
    flat = pa.array(np.asarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width)


def column_matrix(table: pa.Table, name: str) -> np.ndarray:
    """A FixedSizeList<float32> column back as an [N, width] array."""
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    return np.asarray(col.flatten()).reshape(len(col), width)


def filter_users(table: pa.Table, user_ids: Sequence[str]) -> pa.Table:
    """The rows of `table` whose `user_id` is in `user_ids`."""
    return table.filter(pc.is_in(table.column("user_id"), value_set=pa.array(list(user_ids), pa.string())))


# -- Partitions --------------------------------------------------------------------------------


def read_partitions(
    files: VerifiedFiles, n_partitions: int
) -> tuple[pa.Table | None, pa.Table | None, list[dict]]:
    """(pairs, profiles, failures) of partitions 0..n-1, every file checked against its recorded
    hash; pairs and profiles are None when no user of any partition produced pairs."""
    pairs, profiles, failures = [], [], []
    for k in range(n_partitions):
        keys = part_keys(k)
        p = files.get_parquet(keys.pairs)
        if p.num_rows:
            pairs.append(p)
        q = files.get_parquet(keys.profiles)
        if q.num_rows:
            profiles.append(q)
        failures += files.get_jsonl(keys.failures)
    if not pairs:
        return None, None, failures
    return pa.concat_tables(pairs), pa.concat_tables(profiles), failures
