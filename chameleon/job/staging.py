"""How a run's input is cut into partitions, and the record of an input staged off the driver.

The Ray driver places a user by `hash_partition` (the in-process driver keeps input order). Its
input tasks (`job.ray_input`) run in Ray Data workers, which import that module and this one:
neither may import torch or the model, which would add seconds to every worker's start (the input
stage of a 1,000-user job took 17 s instead of a few when they did).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class StagedInput:
    """An input read and validated off the driver (`job.ray_input`): counts, and per partition
    its user ids and where its validated records were staged."""

    records: int
    rejected: int
    partition_ids: list[list[str]]
    inputs: list[dict[str, Any] | None]
    """per partition: the {key, sha256} of its staged records (`inputs/part-K.jsonl`)"""
    sha256: str = ""
    """digest of every accepted record (of the partitions' digests)"""


def hash_partition(user_id: str, n_partitions: int) -> int:
    """A user's partition by a stable hash of the id: the same whatever the rest of the input."""
    return int.from_bytes(hashlib.sha256(user_id.encode("utf-8")).digest()[:8], "big") % n_partitions


def jsonl_safe_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows that JSON can always carry (repr of anything it cannot)."""
    return [json.loads(json.dumps(r, default=repr)) for r in rows]
