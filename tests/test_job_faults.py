"""Bounded failure: a partition that kills its actor or hangs (local Ray, real actors dying), and
store outages (a real SeaweedFS paused with SIGSTOP)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from conftest import stub_manifest, tiny_job_config

from chameleon.data.artifacts import RunReader, RunWriter, latest_run_id
from chameleon.data.storage import S3Store, StoreUnavailableError
from chameleon.dev.demo import example_users
from chameleon.dev.s3server import LocalS3Server
from chameleon.job.local import run_local
from chameleon.job.publish import JobFailedError
from chameleon.job.ray_job import FAULTS_ENV, run_ray_job
from chameleon.job.run import hash_partition

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
        **{"job.max_task_retries": 0, "job.partition_timeout_s": 15.0, "job.max_user_failures": 0.5},
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
    assert all("passed its deadline (15 s) 1 times" in f["reason"] for f in failures)


# -- store outages -------------------------------------------------------------------------------


@pytest.fixture
def own_s3():
    """A SeaweedFS of this test alone: pausing it must not stall other tests."""
    with LocalS3Server(backend="seaweedfs") as server:
        yield server


def _signal(server: LocalS3Server, sig: int) -> None:
    os.killpg(os.getpgid(server._proc.pid), sig)


def test_store_outage_is_retried_then_fails_cleanly_keeping_latest(own_s3, tiny_model_dir, tmp_path):
    retry = {"read_timeout": 1.0, "connect_timeout": 1.0, "max_attempts": 2, "retry_deadline_s": 6.0}
    store = S3Store("outage", "p", create_bucket=True, **own_s3.storage_options(), **retry)
    previous = RunWriter(store, "r0")
    previous.put_json("x.json", {})
    previous.commit(stub_manifest())

    # A short outage is ridden out.
    _signal(own_s3, signal.SIGSTOP)
    threading.Timer(2.0, _signal, (own_s3, signal.SIGCONT)).start()
    t0 = time.monotonic()
    store.put_bytes("probe", b"x")
    assert time.monotonic() - t0 >= 1.5 and store.get_bytes("probe") == b"x"

    # An outage longer than the retries, after the first partition: the job fails with a clear
    # message, writes no manifest, and `latest` stays at the previous run.
    def pause_after_first_partition():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not store.exists("runs/r1/parts/part-00000.json"):
            time.sleep(0.05)
        _signal(own_s3, signal.SIGSTOP)

    watcher = threading.Thread(target=pause_after_first_partition)
    watcher.start()
    cfg = tiny_job_config(tiny_model_dir, **{"groups.n_groups": 1, "job.users_per_partition": 2})
    try:
        with pytest.raises(StoreUnavailableError, match=r"kept failing for \d+ s .*retry deadline 6 s"):
            run_local(_users_file(tmp_path, example_users(1)[:6]), store, "r1", cfg, progress=False)
    finally:
        watcher.join()
        _signal(own_s3, signal.SIGCONT)
    assert not store.exists("runs/r1/manifest.json")
    assert latest_run_id(store) == "r0"
