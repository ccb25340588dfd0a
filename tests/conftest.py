"""Shared fixtures. Storage: a real S3-compatible server (SeaweedFS, SigV4 auth) on loopback."""

from __future__ import annotations

import re
import uuid

import pytest

from chameleon.config import EditConfig
from chameleon.data.manifest import Counts, ModelInfo, RunManifest
from chameleon.data.storage import LocalStore, S3Store
from chameleon.dev.s3server import LocalS3Server

TEST_BUCKET = "chameleon-test"


def stub_manifest(**fields) -> RunManifest:
    """A valid manifest for a test run that holds files only (no edits); `fields` override."""
    none = dict(accepted=0, partitions=0, users_mapped=0, users_failed=0, users_with_edit=0, groups=0)
    base = dict(
        model=ModelInfo(id="stub", fingerprint={}),
        hidden_size=1,
        captured_layers=[0],
        site="residual",
        max_rank=1,
        edit=EditConfig(),
        prompt_version="stub",
        groups=[],
        user_shards=[],
        counts=Counts(**none, pairs=0, pairs_kept=0),
        timings_s={},
        config={},
    )
    return RunManifest(**{**base, **fields})


@pytest.fixture(scope="session")
def s3_server():
    """One SeaweedFS for the whole session (about 1 s to start), with generated access keys."""
    with LocalS3Server(backend="seaweedfs") as server:
        yield server


@pytest.fixture
def s3_store(s3_server: LocalS3Server, request: pytest.FixtureRequest) -> S3Store:
    """A fresh, empty prefix per test in one shared bucket (a new SeaweedFS bucket costs ~0.3 s)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:80]
    return s3_server.store(TEST_BUCKET, f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (2 CPUs, every port on loopback)."""
    import os

    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture
def local_store(tmp_path) -> LocalStore:
    """An empty local store in the test's temporary directory."""
    return LocalStore(tmp_path / "store")


# -- models and a published run (tiny random model, real tokenizer) -----------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (4 layers, hidden 64) saved with SmolLM2's real tokenizer."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def tiny_job_config(model_dir, **overrides):
    """A fast job config for the tiny model (short generations, few CCS steps)."""
    from chameleon.config import ChameleonConfig

    base = {
        "model.name_or_path": str(model_dir),
        "synth.pairs_per_user": 4,
        "synth.insight_max_new_tokens": 8,
        "synth.answer_max_new_tokens": 8,
        "synth.batch_size": 32,
        "subspace.ccs_steps": 100,
        "subspace.ccs_restarts": 3,
        "groups.n_groups": 3,
        "groups.min_group_size": 2,
        "groups.min_contributors": 2,
        "job.users_per_partition": 4,
    }
    return ChameleonConfig().with_overrides({**base, **overrides})


@pytest.fixture(scope="session")
def published_tiny_run(s3_server, tiny_model_dir, tmp_path_factory):
    """A run of the in-process job on the 12 demo users with the tiny model, published to
    SeaweedFS. Returns (store, manifest, model_dir)."""
    from chameleon.dev.demo import write_example_users
    from chameleon.job.local import run_local

    users = write_example_users(tmp_path_factory.mktemp("users") / "users.jsonl")
    store = s3_server.store(TEST_BUCKET, f"published-{uuid.uuid4().hex[:8]}")
    manifest = run_local(str(users), store, "tiny-run-1", tiny_job_config(tiny_model_dir), progress=False)
    return store, manifest, tiny_model_dir


def copy_run(
    src,
    dst,
    run_id: str,
    new_id: str | None = None,
    *,
    manifest_edit=None,
    corrupt: str | None = None,
    set_latest: bool = False,
) -> str:
    """Copy a committed run between stores (optionally renamed, with an edited manifest or one
    corrupted file whose recorded checksum is kept), manifest last."""
    new_id = new_id or run_id
    manifest = src.get_json(f"runs/{run_id}/manifest.json")
    for rel, entry in manifest["files"].items():
        key = entry.get("key", rel)  # a run's objects live under its writer's attempt folder
        data = src.get_bytes(f"runs/{run_id}/{key}")
        if rel == corrupt:
            data = data[:-8] + bytes(8)
        dst.put_bytes(f"runs/{new_id}/{key}", data)
    manifest["run_id"] = new_id
    if manifest_edit:
        manifest_edit(manifest)
    dst.put_json(f"runs/{new_id}/manifest.json", manifest)
    if set_latest:
        dst.put_text("latest", new_id + "\n")
    return new_id
