"""The in-process job end to end on a real S3 server with a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_job_config

from chameleon.config import EditConfig
from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.generation import bank_for_edits, chat_prompt, distinct_edits, encode, generate_answers
from chameleon.core.model import load_model
from chameleon.data.artifacts import RunReader
from chameleon.data.published import PublishedRun
from chameleon.dev.demo import EXAMPLE_STYLES
from chameleon.job.local import run_local


def test_published_layout_and_manifest(published_tiny_run):
    store, manifest, _ = published_tiny_run
    objects = set(store.list("runs/tiny-run-1/"))
    assert {"runs/tiny-run-1/manifest.json", "runs/tiny-run-1/job-spec.json"} <= objects
    assert store.get_text("latest").strip() == "tiny-run-1"
    reader = RunReader(store, "latest")
    files = manifest.files
    assert {
        "assignments.parquet",
        "rejects.jsonl",
        "users/shard-00000.safetensors",
        "centroids.safetensors",
        "calibration.json",
    } <= set(files)
    # Each logical file lives in the attempt folder of the writer that wrote it.
    assert {"runs/tiny-run-1/" + e.key for e in files.values()} <= objects
    assert all(e.key.startswith("attempts/") and e.key.endswith(rel) for rel, e in files.items())
    assert manifest.job_spec["partition_size"] == 4 and manifest.job_spec["input"]["accepted"] == 12
    assert manifest.counts.accepted == 12 and manifest.counts.rejected == 0
    assert manifest.prompt_version and manifest.site == "residual"
    run = PublishedRun(reader)
    assign = run.assignments()
    assert set(assign) == {f"{s}-{k}" for s in EXAMPLE_STYLES for k in (1, 2)}
    sizes = {g.group_id: g.n_users for g in manifest.groups}
    assert sum(sizes.values()) == 12 and min(sizes.values()) >= 2
    curves = reader.get_json("calibration.json")
    for row in manifest.groups:
        gid, cal = row.group_id, row.calibration
        edit = run.group_edit(gid)
        assert edit.form == "additive" and len(edit.layers) == 1
        assert edit.layers[0] in manifest.captured_layers
        assert torch.isfinite(edit.steer).all()
        # Calibration never makes the held-out texts less likely than the base model.
        assert cal.nll <= cal.base_nll and curves[gid]["curve"]["base"] == cal.base_nll
        assert (cal.strength > 0) == (float(edit.steer.norm()) > 0)


def test_user_edits_and_personalized_generation(published_tiny_run):
    store, manifest, model_dir = published_tiny_run
    run = PublishedRun(RunReader(store, "tiny-run-1"))
    cfg = tiny_job_config(model_dir)
    model, tok = load_model(cfg.model)
    run.reader.check_model(fingerprint_model(model, str(model_dir)))
    users = ["shouty_fan-1", "hashtag_fan-2", "terse_engineer-1"]
    edit = run.user_edit(users[0])
    assert edit is not None and edit.theta_p.shape[0] == len(edit.layers)
    queries = ["Write a short tweet about dinner."] * 3
    base = generate_answers(model, tok, queries, edits=run.edits_for(users, "none"), max_new_tokens=6)
    assert base == generate_answers(model, tok, queries, max_new_tokens=6)
    # Group and user edits both reach the model: every row's next-token logits move, and rows
    # left unedited (row 0) stay bit-identical.
    enc = encode(tok, [chat_prompt(tok, q) for q in queries] * 2)
    with torch.no_grad():
        plain = model(**enc).logits[:, -1]
        for level in ("group", "user"):
            edits = run.edits_for(users, level)
            assert all(e is not None for e in edits)
            unique, index = distinct_edits(edits)
            bank, rows = bank_for_edits(model, unique, EditConfig(alpha=8.0, centered=False))
            with bank.apply(model, [rows[i] for i in index] + [0] * 3):
                edited = model(**enc).logits[:, -1]
            assert ((edited[:3] - plain[:3]).abs().amax(-1) > 1e-4).all(), level
            assert torch.equal(edited[3:], plain[3:])
    # Rows of one group share one Edit object, read once.
    group_edits = run.edits_for(["shouty_fan-1", "shouty_fan-2"], "group")
    if run.user_group("shouty_fan-1") == run.user_group("shouty_fan-2"):
        assert group_edits[0] is group_edits[1]


def test_marker_parts_reach_only_the_users_whose_history_shows_the_marker(published_tiny_run):
    store, manifest, _ = published_tiny_run
    run = PublishedRun(RunReader(store, "tiny-run-1"))
    # The tiny model has 4 layers: the default marker layers are [3].
    spec = manifest.marker_parts
    assert spec["markers"] == ["emoticon"] and spec["layers"] == [3] and spec["strength"] == 0.25
    assert 0 < spec["n_queries"] <= 32 and "markers.safetensors" in manifest.files
    assert 3 in manifest.bank_spec().layers
    shown = {u for u in run.assignments() if run.user_markers(u) == ("emoticon",)}
    assert shown == {"emoji_lover-1", "emoji_lover-2"} and spec["users"] == {"emoticon": 2}
    direction = run.marker_parts().directions["emoticon"]
    assert direction.shape == (1, manifest.hidden_size) and float(direction.norm()) > 0
    for user in run.assignments():
        group = run.group_edit(run.user_group(user))
        served = run.edit_for(user, "group")
        if user not in shown:  # everybody else is served the group's edit itself
            assert served is group
            continue
        assert served.layers == sorted({3, *group.layers}) and served.form == "additive"
        expected = {
            layer: 0.25 * direction[0] if layer == 3 else torch.zeros_like(direction[0])
            for layer in served.layers
        }
        for i, layer in enumerate(group.layers):
            expected[layer] = expected[layer] + group.steer[i]
        assert torch.allclose(served.steer, torch.stack([expected[layer] for layer in served.layers]))
        assert run.edit_for(user, "group") is served, "one served row per (group, markers)"
    # A bounded cache drops a group's rows with marker parts with the group's edit.
    bounded = PublishedRun(RunReader(store, "tiny-run-1"), group_cache_size=1)
    user = sorted(shown)[0]
    gid = bounded.user_group(user)
    served = bounded.served_edit(gid, ("emoticon",))
    assert bounded.served_edit(gid, ("emoticon",)) is served
    bounded.group_edit(next(g for g in bounded.group_ids if g != gid))  # evicts gid
    again = bounded.served_edit(gid, ("emoticon",))
    assert again is not served and torch.equal(again.steer, served.steer)


def test_bad_records_are_rejected_with_reasons(tmp_path, local_store, tiny_model_dir):
    from chameleon.dev.demo import example_users

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
    for needle in (
        "missing user_id",
        "history is empty",
        "history must be a list",
        "duplicate user_id",
        "user_id must be",
        "unreadable",
    ):
        assert needle in reasons
    assert manifest.counts.accepted == 3 and manifest.counts.rejected == 7


def test_committed_run_is_immutable(published_tiny_run, tiny_model_dir, tmp_path):
    from chameleon.data.artifacts import RunImmutableError
    from chameleon.dev.demo import write_example_users
    from chameleon.job.spec import JobSpecMismatchError

    store, manifest, _ = published_tiny_run
    users = str(write_example_users(tmp_path / "u.jsonl"))
    before = store.list("runs/tiny-run-1/")
    cfg = tiny_job_config(tiny_model_dir)
    # The same job again: the committed run is the answer, and nothing is written.
    assert run_local(users, store, "tiny-run-1", cfg, progress=False) == manifest
    with pytest.raises(JobSpecMismatchError, match="it is committed, so give this job a new run id"):
        run_local(users, store, "tiny-run-1", cfg.with_overrides({"synth.pairs_per_user": 5}), progress=False)
    with pytest.raises(RunImmutableError, match="--restart cannot start it over"):
        run_local(users, store, "tiny-run-1", cfg, progress=False, restart=True)
    assert store.list("runs/tiny-run-1/") == before
