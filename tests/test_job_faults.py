"""Bounded failure: a partition that kills its actor or hangs (local Ray, real actors dying).

Store outages (a real SeaweedFS paused with SIGSTOP mid-job: a short one ridden out, a long one
failing cleanly with no manifest and `latest` kept) are the outage check of
`jobs/bench/job_integrity.py`, which `tests/test_bench_job.py` runs and holds to its goals."""

from __future__ import annotations

import json
import time

import pytest
from conftest import tiny_job_config

from chameleon.data.artifacts import RunReader
from chameleon.dev.demo import example_users
from chameleon.job.publish import JobFailedError
from chameleon.job.ray_job import FAULTS_ENV, run_ray_job
from chameleon.job.staging import hash_partition

pytestmark = pytest.mark.slow


def _users_file(tmp_path, users) -> str:
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    return str(path)


def _ray_config(model_dir, **overrides):
    base = {
        "job.users_per_partition": 2,
        "job.num_actors": 1,
        "job.num_cpus_per_actor": 0.5,
        "groups.n_groups": 1,
        "edit.calibrate": False,  # no calibration pool: these tests are about the map stage
    }
    return tiny_job_config(model_dir, **{**base, **overrides})


def test_a_partition_that_keeps_killing_its_actor_fails_the_job_in_bounded_time_then_is_mapped_again(
    ray_local, s3_store, tiny_model_dir, tmp_path, monkeypatch
):
    users = example_users(1)[:6]  # 3 partitions by user-id hash
    path = _users_file(tmp_path, users)
    cfg = _ray_config(tiny_model_dir, **{"job.max_task_retries": 1, "job.max_user_failures": 0.0})
    poison = users[2]["user_id"]
    k = hash_partition(poison, 3)
    n_failed = sum(hash_partition(u["user_id"], 3) == k for u in users)
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"exit_on_user": poison}))
    t0 = time.monotonic()
    with pytest.raises(
        JobFailedError, match=rf"{n_failed} of 6 users failed .*partition {k}: killed its actor .* 2 times"
    ):
        run_ray_job(path, s3_store, "r1", cfg)
    assert time.monotonic() - t0 < 300  # Ray Data's defaults would retry it forever (300: a loaded 2-core CI)
    assert not s3_store.exists("runs/r1/manifest.json")
    monkeypatch.delenv(FAULTS_ENV)
    manifest = run_ray_job(path, s3_store, "r1", cfg)  # the failed partition is mapped again
    c = manifest.counts
    assert c.partitions_resumed == 2 and c.users_failed == 0 and c.users_mapped == 6


def test_a_partition_past_its_deadline_stops_its_actor_and_counts_as_failed(
    ray_local, s3_store, tiny_model_dir, tmp_path, monkeypatch
):
    users = example_users(1)[:6]
    path = _users_file(tmp_path, users)
    cfg = _ray_config(
        tiny_model_dir,
        # A partition of at most 3 tiny-model users maps in about a second (the deadline covers
        # the map, not the actor's model load): 8 s leaves room on a loaded 2-core machine.
        **{"job.max_task_retries": 0, "job.partition_timeout_s": 8.0, "job.max_user_failures": 0.5},
    )
    partitions: dict[int, list[str]] = {}  # the 6 users in 3 partitions by user-id hash (sizes vary)
    for u in users:
        partitions.setdefault(hash_partition(u["user_id"], 3), []).append(u["user_id"])
    k, members = min(partitions.items(), key=lambda kv: (len(kv[1]), kv[0]))  # a small one: under 50 %
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"hang_on_user": members[-1]}))
    manifest = run_ray_job(path, s3_store, "r1", cfg)
    c = manifest.counts
    assert c.partitions_failed == 1 and c.users_failed == len(members) and c.users_mapped == 6 - len(members)
    failures = RunReader(s3_store, "r1").get_jsonl(f"failures/part-{k:05d}.jsonl")
    assert {f["user_id"] for f in failures} == set(members)
    assert all("passed its deadline (8 s) 1 times" in f["reason"] for f in failures)
