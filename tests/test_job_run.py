"""The drivers' shared bookkeeping: partitions, adoption on resume, the failure limit, group ids."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_job_config

from chameleon.core.records import HistoryItem, UserRecord
from chameleon.data.artifacts import RunReader, RunWriter
from chameleon.data.layout import CENTROIDS, group_key, part_keys
from chameleon.data.published import PublishedRun
from chameleon.dev.demo import example_users
from chameleon.job.local import run_local
from chameleon.job.publish import JobFailedError
from chameleon.job.run import adopt_partition, partition_users, write_partition
from chameleon.job.stages import pairs_to_tables


def _users_file(tmp_path, users):
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    return str(path)


def _record(i: int) -> UserRecord:
    return UserRecord(user_id=f"u{i}", history=(HistoryItem(text=f"tweet {i}"),))


def test_partitions_are_fixed_slices_in_input_order():
    users = [_record(i) for i in range(10)]
    parts = partition_users(users, 4)
    assert [[u.user_id for u in p] for p in parts] == [
        ["u0", "u1", "u2", "u3"],
        ["u4", "u5", "u6", "u7"],
        ["u8", "u9"],
    ]
    assert partition_users(users, 4) == parts  # a rerun maps the same users to the same ids


def test_a_partition_is_adopted_only_when_all_its_files_exist(local_store):
    writer = RunWriter(local_store, "r1")
    pairs, profiles = pairs_to_tables([])
    keys = part_keys(0)
    writer.put_parquet(keys.profiles, profiles)
    assert not adopt_partition(RunWriter(local_store, "r1"), 0)  # pairs (written last) missing
    write_partition(writer, 0, pairs, profiles, [])
    resumed = RunWriter(local_store, "r1")
    assert adopt_partition(resumed, 0)
    assert set(resumed.files) == set(keys.all())


def _write_failed_partition(store, run_id: str, users: list[dict]) -> None:
    """What an earlier attempt leaves when every user of partition 0 failed in the map stage."""
    pairs, profiles = pairs_to_tables([])
    failures = [{"user_id": u["user_id"], "reason": "map stage failed: boom"} for u in users]
    write_partition(RunWriter(store, run_id), 0, pairs, profiles, failures)


@pytest.mark.parametrize("limit, refused", [(0.25, True), (0.75, False)])
def test_failure_limit_counts_failures_of_adopted_partitions(
    tmp_path, local_store, tiny_model_dir, limit, refused
):
    users = example_users(1)[:6]  # 2 partitions of 4 and 2 users
    cfg = tiny_job_config(tiny_model_dir, **{"job.max_user_failures": limit, "groups.n_groups": 1})
    _write_failed_partition(local_store, "r1", users[:4])
    path = _users_file(tmp_path, users)
    if refused:
        with pytest.raises(JobFailedError, match=r"4 of 6 users failed .*limit 25%"):
            run_local(path, local_store, "r1", cfg, progress=False)
        assert not local_store.exists("runs/r1/manifest.json")  # nothing published
    else:
        manifest = run_local(path, local_store, "r1", cfg, progress=False)
        assert manifest["counts"]["users_failed"] == 4 and manifest["counts"]["partitions_resumed"] == 1


def test_group_ids_with_any_allowed_character_and_reserved_looking_names_publish(
    tmp_path, local_store, tiny_model_dir
):
    users = example_users(1)
    names = ["team:a", "team:a", "centroids", "centroids", "ops@x", "ops@x"]
    for u, name in zip(users, names, strict=True):
        u["team"] = name
    cfg = tiny_job_config(tiny_model_dir, **{"groups.group_column": "team"})
    manifest = run_local(_users_file(tmp_path, users), local_store, "r1", cfg, progress=False)
    assert sorted(g["group_id"] for g in manifest["groups"]) == ["centroids", "ops@x", "team:a"]
    reader = RunReader(local_store, "r1")
    assert {group_key(g) for g in ("centroids", "ops@x", "team:a")} | {CENTROIDS} <= set(reader.files)
    run = PublishedRun(reader)
    assert run.user_group(users[2]["user_id"]) == "centroids"
    assert run.group_edit("centroids").layers  # a group, not the centroids file
    assert run.group_edit("team:a") is run.group_edit("team:a")  # read once, then kept
