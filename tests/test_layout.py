"""The run layout: file keys, vector columns, the verified partition reader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from chameleon.data.artifacts import ChecksumMismatchError, RunWriter
from chameleon.data.layout import (
    CENTROIDS,
    column_matrix,
    filter_users,
    group_key,
    part_keys,
    read_partitions,
    user_shards,
    vector_column,
)


def test_keys_of_parts_groups_and_shards():
    assert part_keys(3).pairs == "pairs/part-00003.parquet"
    assert part_keys(3).all()[-1] == part_keys(3).pairs  # the pairs file is written last
    assert group_key("team:a") == "groups/team:a.safetensors"
    assert not CENTROIDS.startswith("groups/")  # no group id can name the centroids file
    with pytest.raises(ValueError, match="invalid group id"):
        group_key("../x")
    shards = user_shards(2050)
    assert [k for k, _ in shards] == [
        "users/shard-00000.safetensors",
        "users/shard-00001.safetensors",
        "users/shard-00002.safetensors",
    ]
    assert shards[-1][1] == slice(2048, 2050)


def test_vector_columns_round_trip_and_user_filter():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = pa.table({"user_id": ["a", "b", "c"], "v": vector_column(values, 4)})
    assert np.array_equal(column_matrix(table, "v"), values)
    assert filter_users(table, ["c", "a"]).column("user_id").to_pylist() == ["a", "c"]


def test_partitions_are_read_through_the_writers_checksums(local_store):
    writer = RunWriter(local_store, "r1")
    for k in range(2):
        keys = part_keys(k)
        writer.put_parquet(keys.profiles, pa.table({"user_id": [f"u{k}"]}))
        writer.put_jsonl(keys.failures, [{"user_id": f"f{k}"}])
        writer.put_parquet(keys.pairs, pa.table({"user_id": [f"u{k}", f"u{k}"]}))
    pairs, profiles, failures = read_partitions(writer, 2)
    assert pairs.num_rows == 4 and profiles.column("user_id").to_pylist() == ["u0", "u1"]
    assert [f["user_id"] for f in failures] == ["f0", "f1"]
    local_store.put_bytes("runs/r1/" + writer.files[part_keys(1).pairs]["key"], b"changed")
    with pytest.raises(ChecksumMismatchError):
        read_partitions(writer, 2)
