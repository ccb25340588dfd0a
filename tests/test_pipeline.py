"""The Ray job on a local Ray with SeaweedFS (real SigV4 auth): layout, rejects, resume.

Map actors killed mid-run (the job still publishes a clean run's artifacts) are the chaos check
of `jobs/bench/job_integrity.py`, which `tests/test_bench_job.py` runs and holds to its goals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_job_config

from chameleon.data.artifacts import RunReader
from chameleon.data.layout import reject_files
from chameleon.data.manifest import RunManifest
from chameleon.data.published import PublishedRun
from chameleon.dev.demo import example_users
from chameleon.job.ray_job import run_ray_job

pytestmark = pytest.mark.slow

N_USERS = 20
BAD_RECORDS = [
    {"history": [{"text": "a record without an id"}]},
    {"user_id": "no-history", "history": []},
    {"user_id": "bad-types", "history": [{"text": 42}]},
    {"user_id": "huge", "history": [{"text": "x" * 10_000}]},
    {"user_id": "bad\ttext", "history": [{"text": "tab in id"}]},
]


def good_users() -> list[dict]:
    """20 of the demo's example users (the project writes them; no LaMP-7 data needed)."""
    return example_users(n_per_style=4)[:N_USERS]


@pytest.fixture(scope="module")
def users_file(tmp_path_factory) -> Path:
    """20 example users plus planted bad records and a duplicated id."""
    records = good_users()
    dup = dict(records[3])
    path = tmp_path_factory.mktemp("users") / "users.jsonl"
    lines = [json.dumps(r) for r in records + BAD_RECORDS + [dup]]
    lines.insert(7, "{broken json")
    path.write_text("\n".join(lines) + "\n")
    return path


def job_config(model_dir, **overrides):
    # One map actor: each actor costs a process and a model load, and these tests are about the
    # job's layout, rejects and resume (several actors: the answers test here, and the chaos
    # check of jobs/bench/job_integrity.py).
    base = {
        "job.num_actors": 1,
        "job.num_cpus_per_actor": 0.5,
        "job.users_per_partition": 2,
        "synth.answer_max_new_tokens": 12,
    }
    return tiny_job_config(model_dir, **{**base, **overrides})


def artifact_hashes(manifest: RunManifest) -> dict[str, str]:
    """Checksums of everything a run publishes except per-attempt bookkeeping."""
    return {k: v.sha256 for k, v in manifest.files.items() if not k.startswith("failures/")}


@pytest.fixture(scope="module")
def clean_run(ray_local, s3_server, tiny_model_dir, users_file):
    store = s3_server.store("pipeline", "clean")
    manifest = run_ray_job(str(users_file), store, "clean", job_config(tiny_model_dir))
    return store, manifest


def test_layout_checksums_assignments_and_rejects(clean_run):
    store, manifest = clean_run
    reader = RunReader(store, "latest")
    assert reader.manifest.run_id == "clean"
    for rel in reader.files:  # every listed file is present and matches its checksum
        reader.get_bytes(rel)
    keys = set(store.list("runs/clean/"))
    n_parts = manifest.counts.partitions
    for k in range(n_parts):
        assert f"runs/clean/parts/part-{k:05d}.json" in keys  # the done record
        for kind, ext in (("pairs", "parquet"), ("profiles", "parquet"), ("failures", "jsonl")):
            assert "runs/clean/" + manifest.files[f"{kind}/part-{k:05d}.{ext}"].key in keys
    accepted = {r["user_id"] for r in good_users()} - {good_users()[3]["user_id"]}
    run = PublishedRun(reader)
    assert set(run.assignments()) == accepted
    assert all(row["group_id"] in run.group_ids for row in run.assignments().values())
    # The Ray driver writes the rejects of each input file, and the duplicates, on their own.
    assert reject_files(reader.files) == ["rejects/duplicates.jsonl", "rejects/file-00000.jsonl"]
    rejects = [r for name in reject_files(reader.files) for r in reader.get_jsonl(name)]
    reasons = [r["reason"] for r in rejects]
    assert len(rejects) == len(BAD_RECORDS) + 3, reasons  # + broken line + both duplicate copies
    assert sum("duplicate user_id" in r for r in reasons) == 2
    assert any("missing user_id" in r for r in reasons) and any("unreadable" in r for r in reasons)
    assert any("characters (limit" in r for r in reasons) and any("must be a string" in r for r in reasons)
    c = manifest.counts
    assert c.accepted == N_USERS - 1 and c.rejected == len(rejects) and c.users_failed == 0
    assert manifest.fingerprint.num_layers == 4


def test_interrupted_driver_resumes_without_recomputing(
    ray_local, clean_run, s3_server, tiny_model_dir, users_file, tmp_path
):
    """A driver killed mid-map (a second driver on the session's Ray: its actors die with it, as
    on a cluster) is resumed by the next one, which keeps the partitions already done."""
    store = s3_server.store("pipeline", "resumed")
    script = tmp_path / "driver.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "from conftest import tiny_job_config\n"
        "from test_pipeline import job_config\n"
        "from chameleon.data.storage import S3Store\n"
        "from chameleon.job.ray_job import run_ray_job\n"
        f"store = S3Store('pipeline', 'resumed', endpoint_url={s3_server.endpoint_url!r}, access_key={s3_server.access_key!r}, secret_key={s3_server.secret_key!r})\n"
        f"run_ray_job({str(users_file)!r}, store, 'resumed', job_config({str(tiny_model_dir)!r}))\n"
    )
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,  # run_ray_job joins it
    }
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(store.list("runs/resumed/parts/")) < 3 and proc.poll() is None:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver (its actors die with it)
        proc.wait()
    done_before = {k: store.get_bytes(k) for k in store.list("runs/resumed/parts/")}
    assert 3 <= len(done_before) < clean_run[1].counts.partitions, "interrupt came too late"
    assert not store.exists("runs/resumed/manifest.json")

    manifest = run_ray_job(str(users_file), store, "resumed", job_config(tiny_model_dir))
    assert manifest.counts.partitions_resumed >= len(done_before)
    for key, data in done_before.items():  # finished partitions were kept, not recomputed
        assert store.get_bytes(key) == data
    assert artifact_hashes(manifest) == artifact_hashes(clean_run[1])


def test_workers_map_the_records_the_driver_accepted_under_raised_limits(
    ray_local, s3_server, tiny_model_dir, tmp_path
):
    """Workers get the validated records: a limit raised in the config holds on the actors too."""
    long_item = "word " * 1000  # 5,000 characters: over the default limit, under the raised one
    users = [
        {
            "user_id": f"long-{i}",
            "history": [{"text": long_item}] + [{"text": f"tweet {i} {j}"} for j in range(3)],
        }
        for i in range(2)
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    store = s3_server.store("pipeline", "raised-limits")
    cfg = job_config(
        tiny_model_dir,
        **{"synth.max_item_chars": 8000, "groups.n_groups": 1, "synth.answer_max_new_tokens": 4},
    )
    manifest = run_ray_job(str(path), store, "raised", cfg)
    assert manifest.counts.accepted == 2 and manifest.counts.users_failed == 0


def test_ray_driver_maps_a_partition_in_which_every_user_failed_again(
    ray_local, s3_server, tiny_model_dir, tmp_path
):
    """A partition whose users all failed (say, on a broken actor) is not adopted by a rerun."""
    from chameleon.data.artifacts import RunWriter
    from chameleon.job.run import write_partition
    from chameleon.job.staging import hash_partition
    from chameleon.job.tables import pairs_to_tables

    users = [
        {"user_id": f"u{i}", "history": [{"text": f"tweet {i} {j}"} for j in range(3)]} for i in range(4)
    ]
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    store = s3_server.store("pipeline", "failure-limit")
    pairs, profiles = pairs_to_tables([])  # partition 0 (by user-id hash): every user failed earlier
    first = [u["user_id"] for u in users if hash_partition(u["user_id"], 2) == 0]
    assert first
    write_partition(RunWriter(store, "r"), 0, pairs, profiles, [{"user_id": u, "reason": "x"} for u in first])
    cfg = job_config(
        tiny_model_dir,
        **{"job.max_user_failures": 0.25, "groups.n_groups": 1, "synth.answer_max_new_tokens": 4},
    )
    manifest = run_ray_job(str(path), store, "r", cfg)
    c = manifest.counts
    assert c.partitions_resumed == 0 and c.users_failed == 0 and c.users_mapped == 4


def test_answer_shards_cover_every_row_once_in_whole_batches():
    from chameleon.job.replicas import answer_shards

    for n, k, b in [(0, 4, 16), (1, 4, 16), (10, 4, 3), (100, 4, 16), (7, 1, 2)]:
        shards = answer_shards(n, k, b)
        assert [i for s in shards for i in s] == list(range(n))
        assert all(len(s) % b == 0 for s in shards[:-1])


def test_answers_on_ray_equal_the_in_process_answers(ray_local, tiny_model_dir):
    """Each row keeps its own edit (or none) across shards and actors; order is the input order."""
    import torch

    from chameleon.config import EditConfig
    from chameleon.core.edit import Edit
    from chameleon.core.generation import generate_answers
    from chameleon.core.model import load_model
    from chameleon.job.replicas import generate_answers_on_ray

    cfg = job_config(tiny_model_dir, **{"job.torch_threads": 1, "job.num_actors": 2})
    model, tok = load_model(cfg.model)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)

    def edit() -> Edit:
        p = torch.nn.functional.normalize(torch.randn(2, 1, d, generator=g), dim=-1)
        n = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1)
        # A far-off μ makes each edit push the tiny random model to its own distinct token.
        return Edit(layers=[1, 2], theta_p=p, theta_n=n, mean=5 * torch.randn(2, d, generator=g), site="mlp")

    e1, e2 = edit(), edit()
    messages = [
        f"Paraphrase the following tweet without any explanation before or after it: tweet number {i} is here"
        for i in range(7)
    ]
    edits = [None, e1, e2, e1, None, e2, e1]
    edit_cfg = EditConfig(alpha=4.0, beta=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = generate_answers(
            model, tok, messages, edits=edits, edit_cfg=edit_cfg, max_new_tokens=6, batch_size=1
        )
        plain = generate_answers(model, tok, messages, max_new_tokens=6, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    on_ray = generate_answers_on_ray(
        cfg, messages, edits=edits, edit_cfg=edit_cfg, max_new_tokens=6, batch_size=1
    )
    assert on_ray == local
    # Rows with different edits answer differently, so a lost or swapped edit would show.
    assert len({local[1], local[2], plain[0]}) == 3 and local[0] == plain[0]
    assert generate_answers_on_ray(cfg, messages, max_new_tokens=6, batch_size=1) == plain
    with pytest.raises(ValueError, match="edits for"):
        generate_answers_on_ray(cfg, messages, edits=edits[:3])
