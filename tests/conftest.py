"""Shared fixtures. Storage: a real S3-compatible server (SeaweedFS, SigV4 auth) on loopback.

`make test` runs two pytest-xdist workers with `--dist loadfile --no-loadscope-reorder`: session
fixtures (the S3 server, Ray, the tiny model and runs) exist once per worker, the tests of one
file run on one worker in file order, so module fixtures and a file's test order hold as in a
plain `pytest`, and the workers take the files in the order `pytest_collection_modifyitems` sets.

Tiers (`make test-unit`, `pytest -m unit|job|e2e`): every test is marked with the heaviest tier
among the fixtures it uses (directly or through other fixtures) and the tier marks it carries:

    e2e   Ray, Serve, a subprocess CLI or the real model: a fixture in E2E_FIXTURES, `slow`, or
          `@pytest.mark.e2e` (a test that starts a fresh interpreter itself)
    job   an in-process job, its stages on a saved model, or the S3 server: a fixture in
          JOB_FIXTURES or named `*_run` (a fixture that publishes a run), or `@pytest.mark.job`
    unit  everything else: no server, no job, no Ray (`make test-unit`; goal under 90 s)
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid

# One torch thread in the test process and in what it starts (Ray workers, benchmarks, CLIs):
# the tests' tensors are tiny, and on a busy 2-core machine a second thread only adds waiting
# (test_vectorized_ccs_equals_per_user_loop: 100 s with 2 threads, 4 s with 1). Set before torch
# is imported; code that sizes its threads itself (`job.torch_threads`) still does.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from stub_runs import stub_manifest  # noqa: F401 (the tests import it from here)

from chameleon.data.storage import LocalStore, S3Store
from chameleon.dev.s3server import LocalS3Server

TIERS = ("unit", "job", "e2e")
E2E_FIXTURES = frozenset({"ray_session", "ray_local", "ray_head"})
JOB_FIXTURES = frozenset({"s3_server", "tiny_run_factory", "tiny_model_dir"})
"""`tiny_model_dir`: the tiny model saved to disk and loaded from its config, as the job loads a
model: the tests that use it run the job's stages (synthesis, a run, serving a run) on it. Unit
tests build the tiny model in memory (`tiny_models.tiny_llama`)."""


def fixture_tier(fixturenames) -> str:
    names = set(fixturenames)
    if names & E2E_FIXTURES:
        return "e2e"
    if names & JOB_FIXTURES or any(n.endswith("_run") for n in names):
        return "job"
    return "unit"


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier (see the module doc), and order the files for `make test`'s
    workers (module doc)."""
    file_tier: dict = {}
    file_tests: dict = {}
    for item in items:
        tiers = [fixture_tier(getattr(item, "fixturenames", ()))]
        tiers += [m.name for m in item.iter_markers() if m.name in TIERS]
        if item.get_closest_marker("slow"):
            tiers.append("e2e")
        tier = max(tiers, key=TIERS.index)
        item.add_marker(getattr(pytest.mark, tier))
        file_tier[item.path] = max(file_tier.get(item.path, 0), TIERS.index(tier))
        file_tests[item.path] = file_tests.get(item.path, 0) + 1
    # Files with e2e tests first, the fewest tests first among them (the whole-system scenarios, a
    # test or two of a minute each), the unit files last to fill in: a long file handed out last
    # would leave the other worker idle. A stable sort: a file's tests stay together and in order.
    items.sort(key=lambda item: (-file_tier[item.path], file_tests[item.path]))


TEST_BUCKET = "chameleon-test"


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


SERVE_KEY_ENV = "CHAMELEON_TEST_SERVE_KEY"
SERVE_API_KEY = "sk-test-" + uuid.uuid4().hex
"""The serving tests' bearer token: in the environment before Ray starts, since the ingress
replicas read it from the environment their worker inherited."""
_RAY = {}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ray(ray, metrics_port: int | None = None) -> None:
    _RAY["metrics_port"] = metrics_port or free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        _metrics_export_port=_RAY["metrics_port"],
    )


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole pytest run, or per worker under `make test`'s pytest-xdist
    (2 CPUs, every port on loopback): a start costs seconds on 2 cores, so the job, evaluation and
    serving tests share it (each Serve test module starts and stops Serve on it). Its workers'
    environment is fixed here, at the start: the serving tests' key and a 1 s metrics interval
    (metrics reach Prometheus within seconds)."""
    import ray

    os.environ.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_metrics_report_interval_ms": "1000",
            SERVE_KEY_ENV: SERVE_API_KEY,
        }
    )
    if ray.is_initialized():  # a test started one of its own and left it up
        ray.shutdown()
    _start_ray(ray)
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def own_ray(**init_options):
    """A local Ray of a test's own (`ray.init` options, e.g. `num_gpus=2` for fake GPUs): the
    session's Ray, when one is up, is stopped for it and started again after (same metrics port)."""
    import ray

    session_was_up = ray.is_initialized()
    if session_was_up:
        ray.shutdown()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, **init_options
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        if session_was_up:
            _start_ray(ray, metrics_port=_RAY.get("metrics_port"))


@pytest.fixture(scope="session")
def ray_local(ray_session):
    """The session's Ray (the name the tests have always used)."""
    return ray_session


@pytest.fixture(scope="session")
def ray_metrics_url(ray_session) -> str:
    """The session Ray's Prometheus endpoint."""
    return f"http://127.0.0.1:{_RAY['metrics_port']}/metrics"


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
        # Off by default (the embedded model carries no marker readably); on here so every tiny
        # run exercises the marker parts (the tiny model's marker layer is 3).
        "edit.markers": ["emoticon"],
    }
    return ChameleonConfig().with_overrides({**base, **overrides})


@pytest.fixture(scope="session")
def tiny_run_factory(s3_server, tiny_model_dir, tmp_path_factory):
    """`publish(**overrides) -> (store, manifest, model_dir)`: the in-process job on the 12 demo
    users with the tiny model (`tiny_job_config(model_dir, **overrides)`), published to SeaweedFS
    as run `tiny-run-1`. One run per distinct configuration for the whole pytest run: tests that
    ask for the same settings share it, so they must not change it (`copy_run` it first)."""
    from chameleon.dev.demo import write_example_users
    from chameleon.job.local import run_local

    users = write_example_users(tmp_path_factory.mktemp("users") / "users.jsonl")
    runs: dict[str, tuple] = {}

    def publish(**overrides):
        cfg = tiny_job_config(tiny_model_dir, **overrides)
        key = cfg.model_dump_json()
        if key not in runs:
            store = s3_server.store(TEST_BUCKET, f"published-{uuid.uuid4().hex[:8]}")
            manifest = run_local(str(users), store, "tiny-run-1", cfg, progress=False)
            runs[key] = (store, manifest, tiny_model_dir)
        return runs[key]

    return publish


@pytest.fixture(scope="session")
def published_tiny_run(tiny_run_factory):
    """The default tiny run (see `tiny_run_factory`). Returns (store, manifest, model_dir)."""
    return tiny_run_factory()


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
            data = data[:-8] + bytes(b ^ 0xFF for b in data[-8:])  # changed even if the tail is zeros
        dst.put_bytes(f"runs/{new_id}/{key}", data)
    manifest["run_id"] = new_id
    if manifest_edit:
        manifest_edit(manifest)
    dst.put_json(f"runs/{new_id}/manifest.json", manifest)
    if set_latest:
        dst.put_text("latest", new_id + "\n")
    return new_id
