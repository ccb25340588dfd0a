"""Model weights from an S3 mirror (clusters without hub access): downloaded once per node under a
file lock, each file checked against the mirror's record, the loaded model against its
fingerprint. Against the loopback S3 server, with the tiny model."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from chameleon.config import ModelConfig
from chameleon.core.fingerprint import ModelMismatchError, fingerprint_model
from chameleon.core.model import load_model
from chameleon.data.model_mirror import DONE, MIRROR_RECORD, fetch_model, load_model_for, mirror_model


@pytest.fixture
def mirror(s3_store, tiny_model_dir):
    """The tiny model mirrored to a fresh S3 prefix: (store, s3:// URI, record)."""
    record = mirror_model(tiny_model_dir, s3_store)
    return s3_store, s3_store.uri, record


def _fetch(uri, cache_dir, store):
    return fetch_model(uri, cache_dir=cache_dir, store=store)


def test_two_loaders_on_a_node_download_once(mirror, tmp_path, tiny_model_dir):
    store, uri, record = mirror
    assert {"config.json", "model.safetensors"} <= set(record["files"]) and record["fingerprint"]
    cache = str(tmp_path / "node-cache")
    # Two processes (two actors of one node) start loading at the same moment.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_fetch, [uri, uri], [cache, cache], [store, store]))
    assert sorted(r.downloaded for r in results) == [False, True], "exactly one of them downloads"
    assert results[0].path == results[1].path
    for name in record["files"]:
        assert (results[0].path / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    # A later loader (a restarted actor) finds the node's copy too.
    assert fetch_model(uri, cache_dir=cache, store=store).downloaded is False
    assert not [p for p in results[0].path.parent.iterdir() if ".partial-" in p.name]


def test_a_mirrored_model_loads_by_its_s3_name_and_matches_its_fingerprint(
    mirror, s3_server, tmp_path, tiny_model_dir, monkeypatch
):
    _store, uri, record = mirror
    for key, value in s3_server.env().items():  # what a pod gets from its S3 Secret
        monkeypatch.setenv(key, value)
    model, tok = load_model_for(ModelConfig(name_or_path=uri, cache_dir=str(tmp_path / "cache")))
    local, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert fingerprint_model(model, uri).weights_sha256 == fingerprint_model(local, "x").weights_sha256
    assert record["fingerprint"]["weights_sha256"] == fingerprint_model(local, "x").weights_sha256
    assert tok("hello")["input_ids"]


def test_a_file_that_differs_from_the_record_is_refused_and_nothing_is_kept(mirror, tmp_path):
    store, uri, _record = mirror
    data = bytearray(store.get_bytes("config.json"))
    data[-2:] = b" }"  # same size, other bytes
    store.put_bytes("config.json", bytes(data))
    with pytest.raises(ValueError, match="config.json differs from the mirror's record"):
        fetch_model(uri, cache_dir=str(tmp_path), store=store)
    assert not list((tmp_path / "models").glob(f"*/{DONE}"))
    assert not [p for p in (tmp_path / "models").iterdir() if p.is_dir()]


def test_weights_that_are_not_the_mirrored_model_are_refused(mirror, s3_server, tmp_path, monkeypatch):
    from tiny_models import save_tiny_model

    store, uri, record = mirror
    other = save_tiny_model(tmp_path / "other", seed=1)
    other_model, _ = load_model(ModelConfig(name_or_path=str(other)))
    store.put_json(
        MIRROR_RECORD, {**record, "fingerprint": fingerprint_model(other_model, "other").to_dict()}
    )
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    cfg = ModelConfig(name_or_path=uri, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelMismatchError, match="is not the model the mirror recorded"):
        load_model_for(cfg)
    # The node's copy is no longer marked complete: the next loader downloads it again.
    assert not list((tmp_path / "cache" / "models").glob(f"*/{DONE}"))


def test_unsafe_names_in_a_record_are_refused(mirror, tmp_path):
    store, uri, record = mirror
    files = {**record["files"], "../../escape": {"sha256": "0" * 64, "bytes": 1}}
    store.put_bytes(MIRROR_RECORD, json.dumps({**record, "files": files}).encode())
    with pytest.raises(ValueError, match="unsafe file name"):
        fetch_model(uri, cache_dir=str(tmp_path), store=store)


def test_the_mirror_script_as_the_readme_runs_it(s3_server, s3_store, tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": str(root)}
    assert s3_store.list("") == []  # creates the test bucket; the script only writes into one
    out = subprocess.run(
        [sys.executable, str(root / "jobs" / "mirror_model.py"), str(tiny_model_dir), s3_store.uri],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"use: --model {s3_store.uri}" in out.stdout
    record = s3_store.get_json(MIRROR_RECORD)
    fetched = fetch_model(s3_store.uri, cache_dir=str(tmp_path), store=s3_store)
    assert fetched.downloaded and set(record["files"]) <= {p.name for p in fetched.path.iterdir()}
