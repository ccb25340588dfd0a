"""Devices: what replicas ask Ray for (GPUs by default when the cluster has them; a clear error when
GPUs are asked of a cluster without), the batch size by device, and length-sorted batches that
give the answers and hidden states of the unsorted order.

The cluster tests start a real local Ray that advertises fake GPUs (`ray.init(num_gpus=2)`):
the resource request is decided from the cluster's resources, the device inside an actor from
what torch sees (here: no CUDA, so the actors that hold a "GPU" still run on the CPU)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from conftest import own_ray, tiny_job_config

from chameleon.config import ChameleonConfig
from chameleon.core.capture import capture
from chameleon.core.devices import NoGpuError, batch_size_for, gpus_per_replica
from chameleon.core.generation import chat_prompt, generate, length_order
from chameleon.flags import JOB_FLAGS, auto_or
from chameleon.ray_env import cluster_gpus

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# -- the decisions, without Ray ------------------------------------------------------------------


def test_auto_asks_for_one_gpu_when_the_cluster_has_gpus_else_none():
    assert gpus_per_replica("auto", 4.0, setting_name="x") == 1.0
    assert gpus_per_replica("auto", 0.0, setting_name="x") == 0.0
    # Fractions and several GPUs per replica are kept as given.
    assert gpus_per_replica(0.25, 1.0, setting_name="x") == 0.25
    assert gpus_per_replica(4, 8.0, setting_name="x") == 4.0
    assert gpus_per_replica(0, 8.0, setting_name="x") == 0.0


def test_gpus_asked_of_a_cluster_without_gpus_are_refused_naming_the_setting():
    with pytest.raises(NoGpuError, match=r"job\.num_gpus_per_actor=0\.5 asks for GPUs.*none"):
        gpus_per_replica(0.5, 0.0, setting_name="job.num_gpus_per_actor")


def test_gpu_groups_that_scale_from_zero_count():
    assert cluster_gpus({"CPU": 4}, None, declared="") == 0
    assert cluster_gpus({"CPU": 4, "GPU": 0}, {"GPU": 16, "CPU": 64}, declared="") == 16
    assert cluster_gpus({"GPU": 2}, {}, declared="") == 2
    # Declared by the cluster's config (Ray 2.60's autoscaler does not report its node types).
    assert cluster_gpus({"CPU": 4}, None, declared="16") == 16
    with pytest.raises(ValueError, match="CHAMELEON_CLUSTER_MAX_GPUS"):
        cluster_gpus({}, None, declared="many")


def test_batch_size_by_device():
    assert batch_size_for("auto", torch.device("cpu")) == 16
    assert batch_size_for(48, torch.device("cpu")) == 48
    cfg = ChameleonConfig()
    assert cfg.synth.batch_size == "auto" and cfg.job.num_gpus_per_actor == "auto"
    assert ChameleonConfig().with_overrides({"synth.batch_size": 8}).synth.batch_size == 8


def test_flags_take_auto_or_a_number():
    parse = auto_or(float)
    assert parse("auto") == "auto" and parse("0.5") == 0.5
    flags = {f.setting: f for f in JOB_FLAGS}
    assert flags["job.num_gpus_per_actor"].type("auto") == "auto"
    assert flags["synth.batch_size"].type("32") == 32
    cfg = ChameleonConfig().with_overrides({"job.num_gpus_per_actor": parse("0.5")})
    assert cfg.job.num_gpus_per_actor == 0.5
    with pytest.raises(ValueError):
        ChameleonConfig().with_overrides({"job.num_gpus_per_actor": -1})


# -- length-sorted batches -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from chameleon.config import ModelConfig
    from chameleon.core.model import load_model

    return load_model(ModelConfig(name_or_path=str(tiny_model_dir)))


MESSAGES = [
    "a long message about the weather today and tomorrow and the day after that, with many words",
    "hi",
    "a medium one about cats",
    "ok",
    "another long message, this one about trains, buses, ferries and the timetables of all of them",
    "short text",
    "x",
]


def test_batches_are_sorted_by_length_and_answers_keep_input_order(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, m) for m in MESSAGES]
    order = length_order(tok, prompts)
    assert order != list(range(len(prompts))), "the fixture must need sorting"
    lengths = [len(tok(prompts[i], add_special_tokens=False)["input_ids"]) for i in order]
    assert lengths == sorted(lengths)
    kwargs = {"max_new_tokens": 6, "batch_size": 2}
    sorted_answers = generate(model, tok, prompts, **kwargs)
    unsorted_answers = generate(model, tok, prompts, sort_by_length=False, **kwargs)
    assert sorted_answers == unsorted_answers
    # And each one is the prompt's own answer (alone in its batch: no padding at all).
    assert sorted_answers == [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]


def test_capture_of_sorted_batches_equals_the_unsorted_order(tiny):
    model, tok = tiny
    texts = [chat_prompt(tok, m) + "an answer " * (k % 3 + 1) for k, m in enumerate(MESSAGES)]
    starts = [len(tok(chat_prompt(tok, m), add_special_tokens=False)["input_ids"]) for m in MESSAGES]
    for reduce in ("last", "answer_mean"):
        kwargs = {"batch_size": 3, "reduce": reduce, "site": "residual"}
        if reduce == "answer_mean":
            kwargs["answer_starts"] = starts
        a = capture(model, tok, texts, [1, 3], **kwargs)
        b = capture(model, tok, texts, [1, 3], sort_by_length=False, **kwargs)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        # Rows are in input order: distinct texts give distinct rows in the same places.
        one = capture(
            model,
            tok,
            texts[:1],
            [1, 3],
            **{**kwargs, **({"answer_starts": starts[:1]} if starts and reduce == "answer_mean" else {})},
        )
        torch.testing.assert_close(a[:1], one, atol=1e-5, rtol=1e-4)


# -- on a Ray cluster with (fake) GPUs, and on one without -----------------------------------------


def _own_ray(num_gpus: int):
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's workers cannot import this test module: ship GpuProbe by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return own_ray(num_gpus=num_gpus)


class GpuProbe:
    """A stand-in actor for the pool: reports the GPUs Ray gave it and the device torch would use."""

    def __init__(self, cfg_json: str) -> None:
        import ray

        from chameleon.config import ModelConfig
        from chameleon.core.model import pick_device

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device = str(pick_device(ModelConfig()))

    def __call__(self, batch):
        n = len(batch["item"])
        return {
            "item": list(batch["item"]),
            "gpus": [",".join(self.gpu_ids)] * n,
            "device": [self.device] * n,
        }


@pytest.fixture(scope="class")
def ray_gpus():
    with _own_ray(num_gpus=2) as ray:
        yield ray


@pytest.fixture(scope="class")
def ray_cpu(ray_session):
    """The session's Ray: a cluster without GPUs (no Ray start of this class's own)."""
    return ray_session


@pytest.mark.e2e
class TestOnAClusterWithGpus:
    def test_map_actors_ask_for_one_gpu_by_default(self, ray_gpus):
        from chameleon.job.replicas import actor_resources, map_with_replicas

        cfg = ChameleonConfig().with_overrides({"job.num_actors": 2})
        assert actor_resources(cfg) == {"num_gpus": 1.0, "num_cpus": 1.0}
        rows = map_with_replicas([{"item": k} for k in range(4)], GpuProbe, cfg)
        assert len(rows) == 4
        # Every actor was given a GPU by Ray; torch sees no CUDA here, so it runs on the CPU.
        assert all(r["gpus"] for r in rows), rows
        assert {r["device"] for r in rows} == {"cpu"}

    def test_a_fraction_shares_a_gpu(self, ray_gpus):
        from chameleon.job.replicas import actor_resources

        cfg = ChameleonConfig().with_overrides({"job.num_gpus_per_actor": 0.5})
        assert actor_resources(cfg)["num_gpus"] == 0.5

    def test_model_replicas_ask_for_one_gpu_by_default(self, ray_gpus, tmp_path):
        from chameleon.serving.app import build_app, replica_gpus
        from chameleon.serving.config import ServeConfig

        cfg = ServeConfig(store=str(tmp_path))
        assert cfg.num_gpus == "auto" and replica_gpus(cfg) == 1.0
        ingress = build_app(cfg)._bound_deployment
        server = ingress.init_args[0]._bound_deployment
        assert server.name == "ChameleonServer"
        assert server.ray_actor_options["num_gpus"] == 1.0
        assert replica_gpus(ServeConfig(store=str(tmp_path), num_gpus=0)) == 0.0

    def test_the_job_runs_its_map_actors_on_the_gpus_and_reports_progress(
        self, ray_gpus, tiny_model_dir, tmp_path, local_store, capsys
    ):
        """The whole Ray job on the fake-GPU cluster: actors ask for a GPU each, run on the CPU
        (torch sees no CUDA), and the map stage's figures reach the log and the manifest."""

        from chameleon.dev.demo import write_example_users
        from chameleon.job.ray_job import run_ray_job

        users = write_example_users(tmp_path / "users.jsonl")
        cfg = tiny_job_config(tiny_model_dir, **{"job.num_cpus_per_actor": 0.5})
        assert cfg.job.num_gpus_per_actor == "auto"
        manifest = run_ray_job(str(users), local_store, "gpu-run", cfg)
        t = manifest.timings_s
        assert t["map_users"] == manifest.counts.accepted and t["map_tokens"] > 0
        err = capsys.readouterr().err
        users = int(t["map_users"])
        assert f"map: users {users}/{users} (100%)" in err and "tok/s" in err


@pytest.mark.e2e
class TestOnAClusterWithoutGpus:
    def test_auto_runs_on_the_cpu(self, ray_cpu, tmp_path):
        from chameleon.job.replicas import actor_resources
        from chameleon.serving.app import replica_gpus
        from chameleon.serving.config import ServeConfig

        assert actor_resources(ChameleonConfig())["num_gpus"] == 0.0
        assert replica_gpus(ServeConfig(store=str(tmp_path))) == 0.0

    def test_gpus_declared_by_the_clusters_config_count(self, ray_cpu, monkeypatch):
        from chameleon.job.replicas import actor_resources

        monkeypatch.setenv("CHAMELEON_CLUSTER_MAX_GPUS", "8")  # a GPU group at zero pods
        assert actor_resources(ChameleonConfig())["num_gpus"] == 1.0

    def test_a_job_asking_for_gpus_fails_at_once_naming_the_setting(self, ray_cpu, tmp_path, local_store):
        from chameleon.job.ray_job import run_ray_job

        cfg = ChameleonConfig().with_overrides({"job.num_gpus_per_actor": 1})
        t0 = time.perf_counter()
        # The input does not even exist: the check comes before anything is read or loaded.
        with pytest.raises(NoGpuError, match=r"job\.num_gpus_per_actor=1 asks for GPUs"):
            run_ray_job(str(tmp_path / "missing.jsonl"), local_store, "gpu-run", cfg)
        assert time.perf_counter() - t0 < 30

    def test_an_endpoint_asking_for_gpus_fails_at_once_naming_the_setting(self, ray_cpu, tmp_path):
        from chameleon.serving.app import build_app
        from chameleon.serving.config import ServeConfig

        with pytest.raises(NoGpuError, match=r"num_gpus \(--num-gpus\)=1 asks for GPUs"):
            build_app(ServeConfig(store=str(tmp_path), num_gpus=1))
