"""The in-process job end to end on a real S3 server with a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_job_config

from chameleon.artifacts import RunReader, fingerprint_model
from chameleon.inference import personalized_generate
from chameleon.local import run_local
from chameleon.model import load_model
from chameleon.runs import PublishedRun


def test_published_layout_and_manifest(published_tiny_run):
    store, manifest, _ = published_tiny_run
    files = set(store.list("runs/tiny-run-1/"))
    expected = {
        "runs/tiny-run-1/manifest.json",
        "runs/tiny-run-1/assignments.parquet",
        "runs/tiny-run-1/rejects.jsonl",
        "runs/tiny-run-1/users/shard-00000.safetensors",
        "runs/tiny-run-1/groups/centroids.safetensors",
    }
    assert expected <= files
    assert store.get_text("latest").strip() == "tiny-run-1"
    reader = RunReader(store, "latest")
    assert set(reader.manifest["files"]) == {f.removeprefix("runs/tiny-run-1/") for f in files} - {"manifest.json"}
    assert manifest["counts"]["accepted"] == 12 and manifest["counts"]["rejected"] == 0
    assert manifest["prompt_version"] and manifest["site"] == "mlp"
    run = PublishedRun(reader)
    assign = run.assignments()
    assert set(assign) == {f"{s}-{k}" for s in ("shouty_fan", "formal_scholar", "emoji_lover", "terse_engineer", "pirate_talker", "sad_poet") for k in (1, 2)}
    sizes = {g["group_id"]: g["n_users"] for g in manifest["groups"]}
    assert sum(sizes.values()) == 12 and min(sizes.values()) >= 2
    for gid in run.group_ids:
        edit = run.group_edit(gid)
        n = min(3, len(manifest["captured_layers"]))
        assert len(edit.layers) == n and set(edit.layers) <= set(manifest["captured_layers"])
        assert torch.isfinite(edit.theta_p).all()
        assert torch.allclose(edit.theta_n.norm(dim=-1), torch.ones(n), atol=1e-4)


def test_user_edits_and_personalized_generation(published_tiny_run):
    store, manifest, model_dir = published_tiny_run
    run = PublishedRun(RunReader(store, "tiny-run-1"))
    cfg = tiny_job_config(model_dir)
    model, tok = load_model(cfg.model)
    run.reader.check_model(fingerprint_model(model, str(model_dir)))
    users = ["shouty_fan-1", "sad_poet-2", "terse_engineer-1"]
    edit = run.user_edit(users[0])
    assert edit is not None and edit.theta_p.shape[0] == len(edit.layers)
    queries = ["Write a short tweet about dinner."] * 3
    base = personalized_generate(model, tok, run, users, queries, level="none", max_new_tokens=6)
    again = personalized_generate(model, tok, run, users, queries, level="none", max_new_tokens=6)
    assert base == again


def test_bad_records_are_rejected_with_reasons(tmp_path, local_store, tiny_model_dir):
    from chameleon.demo import example_users

    users = example_users(1)[:4]
    bad = [
        {"history": [{"text": "no id"}]},
        {"user_id": "empty", "history": []},
        {"user_id": "wrongtype", "history": "not a list"},
        {"user_id": users[0]["user_id"], "history": [{"text": "duplicate"}]},
        {"user_id": "../escape", "history": [{"text": "x"}]},
    ]
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in users + bad) + "{not json\n")
    manifest = run_local(str(path), local_store, "r1", tiny_job_config(tiny_model_dir), progress=False)
    rejects = RunReader(local_store, "r1").get_jsonl("rejects.jsonl")
    reasons = " | ".join(r["reason"] for r in rejects)
    assert len(rejects) == 7, reasons  # 5 bad + both copies of the duplicated id + the broken line
    for needle in ("missing user_id", "history is empty", "history must be a list", "duplicate user_id", "user_id must be", "unreadable"):
        assert needle in reasons
    assert manifest["counts"]["accepted"] == 3 and manifest["counts"]["rejected"] == 7


def test_committed_run_is_immutable(published_tiny_run, tiny_model_dir, tmp_path):
    from chameleon.artifacts import RunImmutableError
    from chameleon.demo import write_example_users

    store, _, _ = published_tiny_run
    users = write_example_users(tmp_path / "u.jsonl")
    with pytest.raises(RunImmutableError):
        run_local(str(users), store, "tiny-run-1", tiny_job_config(tiny_model_dir), progress=False)
