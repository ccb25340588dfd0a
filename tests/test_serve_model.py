"""`chameleon serve` loads the model of the run it serves unless told otherwise; a run made for
another model is still refused by its fingerprint."""

from __future__ import annotations

import pytest
from conftest import stub_manifest

from chameleon.data.artifacts import RunReader, RunWriter
from chameleon.data.manifest import ModelInfo
from chameleon.serving.config import ServeConfig
from chameleon.serving.run_model import manifest_model, with_run_model


def _commit(store, run_id: str, *, name: str, revision: str | None, dtype: str) -> None:
    model = ModelInfo(id=name, revision=revision, fingerprint={})
    RunWriter(store, run_id).commit(stub_manifest(model=model, config={"model": {"dtype": dtype}}))


def test_the_model_comes_from_the_run_unless_told_otherwise(local_store):
    _commit(local_store, "run-a", name="org/model-a", revision="abc123", dtype="bfloat16")
    cfg, source = with_run_model(ServeConfig(store=local_store.uri), local_store)
    assert (cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype) == (
        "org/model-a",
        "abc123",
        "bfloat16",
    )
    assert "run-a" in source and cfg.model_name == "org/model-a"

    # Told otherwise, field by field: a dtype flag keeps the run's model; a model flag keeps its
    # own revision; the device settings are always the deployment's.
    told = ServeConfig.model_validate(
        {"store": local_store.uri, "model": {"dtype": "float32", "device": "cpu"}}
    )
    cfg, _ = with_run_model(told, local_store)
    assert (cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype) == (
        "org/model-a",
        "abc123",
        "float32",
    )
    assert cfg.model.device == "cpu"
    mine = ServeConfig.model_validate({"store": local_store.uri, "model": "org/other"})
    cfg, _ = with_run_model(mine, local_store)
    assert (cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype) == ("org/other", None, "bfloat16")
    everything = {"name_or_path": "org/other", "revision": "v2", "dtype": "float16"}
    cfg, source = with_run_model(ServeConfig.model_validate({"store": local_store.uri, "model": everything}))
    assert cfg.model.model_dump(include=set(everything)) == everything and source == "the configured model"


def test_a_pinned_run_and_latest_each_give_their_own_model(local_store):
    _commit(local_store, "run-a", name="org/model-a", revision=None, dtype="auto")
    _commit(local_store, "run-b", name="org/model-b", revision="r2", dtype="float32")  # latest now
    latest, _ = with_run_model(ServeConfig(store=local_store.uri), local_store)
    pinned, _ = with_run_model(ServeConfig(store=local_store.uri, run="run-a"), local_store)
    assert (latest.model.name_or_path, latest.model.revision) == ("org/model-b", "r2")
    assert (pinned.model.name_or_path, pinned.model.revision, pinned.model.dtype) == (
        "org/model-a",
        None,
        "auto",
    )


def test_without_a_published_run_the_configured_model_stays(local_store):
    cfg = ServeConfig(store=local_store.uri)
    got, source = with_run_model(cfg, local_store)
    assert got.model == cfg.model and "no run published yet" in source


def test_manifest_model_reads_what_the_job_writes(published_tiny_run):
    store, manifest, model_dir = published_tiny_run
    assert manifest_model(RunReader(store, manifest.run_id).manifest) == {
        "name_or_path": str(model_dir),
        "dtype": "auto",
    }


def test_the_runs_model_passes_its_fingerprint_check_and_another_is_refused(published_tiny_run, tmp_path):
    from tiny_models import save_tiny_model

    from chameleon.core.fingerprint import ModelMismatchError, fingerprint_model
    from chameleon.core.model import load_model

    store, manifest, model_dir = published_tiny_run
    cfg, _ = with_run_model(ServeConfig(store=store.uri, run=manifest.run_id), store)
    model, _tok = load_model(cfg.model)
    reader = RunReader(store, manifest.run_id)
    reader.check_model(fingerprint_model(model, cfg.model.name_or_path))  # no error

    other_dir = save_tiny_model(tmp_path / "other", seed=1)
    told, _ = with_run_model(
        ServeConfig.model_validate({"store": store.uri, "run": manifest.run_id, "model": str(other_dir)}),
        store,
    )
    assert told.model.name_or_path == str(other_dir)
    other, _tok = load_model(told.model)
    with pytest.raises(ModelMismatchError):
        reader.check_model(fingerprint_model(other, str(other_dir)))
