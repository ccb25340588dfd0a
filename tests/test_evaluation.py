"""Tests for the evaluation code (chameleon.evaluation): split rule, baselines' prompts, scoring,
bootstrap, the goal verdict, the prediction cache, in-memory reduces, report, command line — not
the figures."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_job_config

import chameleon.evaluation
from chameleon.core.generation import chat_prompt, generate, generate_answers
from chameleon.core.model import load_model
from chameleon.data.artifacts import RunReader, VerifiedFiles
from chameleon.data.published import PublishedRun
from chameleon.data.storage import LocalStore
from chameleon.dev.demo import write_example_users
from chameleon.evaluation import ablations, context, recompute, runs
from chameleon.evaluation.baselines import copy_answer, rag_items, rag_prompt
from chameleon.evaluation.cache import PredictionCache
from chameleon.evaluation.cli import add_eval_parser, eval_config, eval_settings
from chameleon.evaluation.lamp import LAMP7_PROMPT, LampQuestion
from chameleon.evaluation.names import ABLATIONS, EVAL_SYNTH_DEFAULTS, METHODS
from chameleon.evaluation.report import write_report
from chameleon.evaluation.runner import run_evaluation
from chameleon.evaluation.scoring import goal_verdict, paired_comparison, score_methods
from chameleon.evaluation.settings import EvalSettings
from chameleon.evaluation.split import parse_range, select_users
from chameleon.job.local import run_local

REPO_ROOT = Path(__file__).resolve().parents[1]


def _q(i: int, tweet: str = "hello world", profile: list[str] | None = None) -> LampQuestion:
    texts = profile if profile is not None else [f"tweet {i} number {k}" for k in range(3)]
    return LampQuestion(
        id=f"61{i}",
        input=LAMP7_PROMPT + tweet,
        profile=[{"id": f"61{i}_{k}", "text": t} for k, t in enumerate(texts)],
    )


# ---------------------------------------------------------------------------------------------
# The split rule


def test_parse_range():
    assert parse_range("500:600") == (500, 600)
    assert parse_range((0, 4)) == (0, 4)
    for bad in ("500", "a:b", "5:5", "7:3", "-1:4"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_select_users_enforces_the_split_rule():
    qs = [_q(i) for i in range(1500)]
    tuning, reported = select_users(qs, "0:100", "500:600")
    assert [q.id for q in tuning] == [f"61{i}" for i in range(100)]
    assert [q.id for q in reported] == [f"61{i}" for i in range(500, 600)]
    tuning, reported = select_users(qs, (400, 500), (1400, 1500))
    assert len(tuning) == 100 and len(reported) == 100
    with pytest.raises(ValueError, match="split rule"):
        select_users(qs, "450:550", "600:700")  # tuning reaches into the reported part
    with pytest.raises(ValueError, match="split rule"):
        select_users(qs, "0:100", "499:600")  # a tuning user would be reported
    with pytest.raises(ValueError, match="split rule"):
        select_users(qs, "0:100", "1400:1501")  # past the end
    assert select_users(qs, None, "500:501") == ([], [qs[500]])


def test_settings_validate_names_and_ranges():
    s = EvalSettings(out_dir="x", tuning_users="0:10", reported_users="500:510", ablations=("alpha",))
    assert s.tuning_users == (0, 10) and s.reported_users == (500, 510)
    with pytest.raises(ValueError, match="unknown methods"):
        EvalSettings(out_dir="x", methods=("base", "oracle"))
    with pytest.raises(ValueError, match="unknown ablations"):
        EvalSettings(out_dir="x", ablations=("temperature",))


# ---------------------------------------------------------------------------------------------
# Baselines' inputs


def test_copy_answer_is_the_tweet_inside_the_input():
    assert copy_answer(LAMP7_PROMPT + "  omg my cat is SO cute!!  ") == "omg my cat is SO cute!!"


PROFILE = [
    "going to the beach with my dog today",
    "my new laptop keeps crashing, so annoying",
    "the dog ate my homework again lol",
    "watching football with friends tonight",
    "laptop battery died in the middle of class",
]


def test_rag_retrieves_the_matching_profile_items_with_the_tweet_as_query():
    q = _q(1, tweet="my laptop battery is dead", profile=PROFILE)
    assert sorted(rag_items(q, 2)) == [1, 4]
    q = _q(2, tweet="walked the dog", profile=PROFILE)
    assert sorted(rag_items(q, 2)) == [0, 2]


def test_rag_prompt_has_lamp7_retrieval_form():
    q = _q(1, tweet="my laptop battery is dead", profile=PROFILE)
    p = rag_prompt(q, 2)
    assert p.endswith("are written by a person. Following the given patterns " + q.input)
    head = p.split(" are written by a person.")[0]
    assert head.count(", and ") == 1
    assert f'"{PROFILE[1]}" ' in head and f'"{PROFILE[4]}" ' in head
    assert PROFILE[0] not in p and PROFILE[3] not in p
    assert rag_prompt(q, 0) == q.input
    assert rag_prompt(q, 10).count(", and ") == len(PROFILE) - 1  # k > profile size: every item once


# ---------------------------------------------------------------------------------------------
# Scoring on known inputs


def test_score_methods_known_values_and_comparisons():
    golds = ["the cat sat on the mat", "a b c d"]
    preds = {
        "copy": ["the cat sat on the mat", "a b c d"],  # perfect
        "base": ["the cat", "x y z w"],
        "rag": ["", "a b c d"],
    }
    s = score_methods(preds, golds, n_resamples=200)
    assert s["copy"]["rouge1"] == pytest.approx(1.0) and s["copy"]["rougeL"] == pytest.approx(1.0)
    # "the cat" vs 6-token gold: P = 1, R = 2/6 -> F = 0.5; second item 0
    assert s["base"]["per_user"]["rouge1"] == pytest.approx([0.5, 0.0])
    assert s["base"]["rouge1"] == pytest.approx(0.25)
    assert s["rag"]["rougeL"] == pytest.approx(0.5)  # empty prediction scores 0
    vb = s["rag"]["vs_base"]["rougeL"]
    assert vb["diff"] == pytest.approx(0.25)
    assert vb["rel"] == pytest.approx(0.5 / 0.25 - 1)
    assert vb["diff_ci95"][0] <= vb["diff"] <= vb["diff_ci95"][1]
    assert vb["sign_test"]["n_pos"] == 1 and vb["sign_test"]["n_neg"] == 1
    assert "vs_base" not in s["base"] and "vs_rag" not in s["rag"]
    assert s["base"]["vs_copy"]["rougeL"]["diff"] < 0  # gap to the sanity line


def test_bootstrap_intervals_are_deterministic_and_contain_the_mean():
    rng = np.random.default_rng(1)
    golds = [" ".join(rng.choice(list("abcdefgh"), 6)) for _ in range(60)]
    preds = {"base": [" ".join(rng.choice(list("abcdefgh"), 6)) for _ in range(60)], "copy": golds}
    a = score_methods(preds, golds, n_resamples=300, seed=3)
    b = score_methods(preds, golds, n_resamples=300, seed=3)
    assert a["base"]["rouge1_ci95"] == b["base"]["rouge1_ci95"]
    lo, hi = a["base"]["rouge1_ci95"]
    assert lo < a["base"]["rouge1"] < hi
    assert hi - lo < 0.25
    # a constant method has a zero-width interval
    assert a["copy"]["rougeL_ci95"] == pytest.approx([1.0, 1.0])


def _fake_scores(base: float, rag: float, group: float, n: int = 50, noise: float = 0.01):
    rng = np.random.default_rng(0)
    b = np.full(n, base) + rng.normal(0, noise, n)
    preds = {}
    per = {
        "base": b,
        "rag": np.full(n, rag) + rng.normal(0, noise, n),
        "chameleon_group": b * (group / base) + rng.normal(0, noise, n),
    }
    out = {}
    for m, v in per.items():
        preds[m] = v
        out[m] = {"per_user": {"rougeL": v.tolist(), "rouge1": v.tolist()}}
    for m in ("rag", "chameleon_group"):
        out[m]["vs_base"] = {"rougeL": paired_comparison(per[m], per["base"], 300)}
    out["chameleon_group"]["vs_rag"] = {"rougeL": paired_comparison(per["chameleon_group"], per["rag"], 300)}
    return out


def test_goal_verdict():
    met = goal_verdict(_fake_scores(base=0.30, rag=0.25, group=0.36))
    assert met["met"] and met["beats_base_by_target"] and met["beats_rag"]
    assert met["rel_vs_base"] == pytest.approx(0.2, abs=0.02)
    short = goal_verdict(_fake_scores(base=0.30, rag=0.25, group=0.33))  # +10 %: significant but short
    assert not short["met"] and not short["beats_base_by_target"] and short["beats_rag"]
    below_rag = goal_verdict(_fake_scores(base=0.20, rag=0.40, group=0.24))
    assert below_rag["beats_base_by_target"] and not below_rag["beats_rag"] and not below_rag["met"]
    assert goal_verdict({"base": {}})["evaluated"] is False


# ---------------------------------------------------------------------------------------------
# Prediction cache (resume)


def test_prediction_cache_roundtrip_and_resume(tmp_path):
    cache = PredictionCache(tmp_path)
    key = {"model": "m", "alpha": 1.0}
    calls = []

    def produce():
        calls.append(1)
        return ["a", "b"]

    assert cache.cached("base", key, ["u1", "u2"], produce) == (["a", "b"], False)
    assert cache.cached("base", key, ["u1", "u2"], produce) == (["a", "b"], True)
    assert cache.get("base", key, ["u2", "u1"]) == ["b", "a"]
    assert len(calls) == 1
    assert cache.get("base", {"model": "m", "alpha": 2.0}, ["u1"]) is None  # another configuration
    assert cache.get("base", key, ["u1", "u3"]) is None  # users not covered


def test_prediction_cache_writes_through_a_unique_temporary_file(tmp_path):
    cache = PredictionCache(tmp_path)
    key = {"model": "m"}
    cache.path("base", key).with_suffix(".tmp").mkdir()  # a fixed temporary name would collide with this
    cache.put("base", key, ["u1"], ["a"])
    cache.put("base", key, ["u1"], ["b"])  # replaced whole
    assert cache.get("base", key, ["u1"]) == ["b"]
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [
        cache.path("base", key).name
    ]  # nothing left over


# ---------------------------------------------------------------------------------------------
# Generation, in-memory reduce, derived runs (tiny random model)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """The in-process job on the 12 demo users with the tiny model, in a local store."""
    root = tmp_path_factory.mktemp("eval-run")
    users = write_example_users(root / "users.jsonl")
    store = LocalStore(root / "store")
    # Uncalibrated, so the in-memory reduce (which has no model to calibrate with) must give
    # exactly the published edits.
    cfg = tiny_job_config(tiny_model_dir, **{"edit.calibrate": False})
    model_tok = load_model(cfg.model)
    manifest = run_local(str(users), store, "r1", cfg, model_and_tokenizer=model_tok, progress=False)
    return store, manifest, cfg, model_tok


def test_generate_answers_keeps_input_order_and_applies_edits(tiny_run):
    store, manifest, cfg, (model, tok) = tiny_run
    msgs = ["short", "a much longer message with many more tokens than the first one", "mid length one"]
    got = generate_answers(model, tok, msgs, max_new_tokens=5, batch_size=2)
    want = [generate(model, tok, [chat_prompt(tok, m)], max_new_tokens=5)[0] for m in msgs]
    assert got == want  # length-sorted batching, answers back in input order
    pairs, profiles = runs.read_run_tables(store, "r1")
    fit = runs.fit_edits(pairs, profiles, manifest.captured_layers, cfg)
    uid = sorted(fit.user)[0]
    edit = fit.user[uid]
    plain = generate_answers(model, tok, msgs, edits=[None, None, None], max_new_tokens=5)
    assert plain == got  # no edit = base model, bit for bit
    strong = cfg.edit.model_copy(update={"alpha": 50.0, "beta": 1.0})
    edited = generate_answers(model, tok, msgs, edits=[edit, None, edit], edit_cfg=strong, max_new_tokens=5)
    assert edited[1] == got[1]
    assert edited != got


def test_fit_edits_matches_published_run_and_group_sizes(tiny_run):
    store, manifest, cfg, _ = tiny_run
    pairs, profiles = runs.read_run_tables(store, "r1")
    fit = runs.fit_edits(pairs, profiles, manifest.captured_layers, cfg)
    run = PublishedRun(RunReader(store, "r1"))
    assert set(fit.user) == set(run.assignments())
    for uid, edit in fit.user.items():
        published = run.user_edit(uid)
        assert (edit is None) == (published is None)
        if edit is not None:
            assert edit.layers == published.layers
            assert np.allclose(edit.theta_n.numpy(), published.theta_n.numpy(), atol=1e-5)
    assert {u: fit.group_of[u] for u in fit.user} == {u: run.user_group(u) for u in fit.user}
    assert sum(fit.group_sizes.values()) == len(fit.user)
    one = runs.fit_edits(
        pairs, profiles, manifest.captured_layers, cfg.with_overrides(ablations.group_overrides("all", 12))
    )
    assert len(one.group) == 1 and one.mean_group_size == 12


def test_derived_run_on_a_subset_and_unseen_assignment(tiny_run):
    store, manifest, cfg, _ = tiny_run
    ids = sorted(PublishedRun(RunReader(store, "r1")).assignments())
    seen, unseen = ids[:8], ids[8:]
    m = runs.derive_run(store, "r1", "r1-sub", cfg, seen)
    assert m.counts.users_mapped == 8
    assert runs.derive_run(store, "r1", "r1-sub", cfg, seen).created_at == m.created_at  # reused, not redone
    run = PublishedRun(RunReader(store, "r1-sub"))
    assert set(run.assignments()) == set(seen)
    _, profiles = runs.read_run_tables(store, "r1", unseen)
    emb = runs.history_embeddings(profiles, unseen)
    assert emb.shape == (4, manifest.hidden_size)
    gids, dist = run.assign_unseen(emb)
    assert len(gids) == 4 and set(gids) <= set(run.group_ids)


def test_recapture_at_the_same_site_reproduces_the_stored_states(tiny_run):
    store, manifest, cfg, (model, tok) = tiny_run
    pairs, _ = runs.read_run_tables(store, "r1")
    pairs = pairs.slice(0, 6)
    again = runs.recapture_pairs(model, tok, pairs, manifest.captured_layers, cfg, manifest.site)
    a = np.asarray(pairs.column("emb_p").combine_chunks().flatten())
    b = np.asarray(again.column("emb_p").combine_chunks().flatten())
    assert np.allclose(a, b, atol=1e-4)
    other = "mlp" if manifest.site == "residual" else "residual"
    resid = runs.recapture_pairs(model, tok, pairs, manifest.captured_layers, cfg, other)
    assert resid.column("emb_n").type == pairs.column("emb_n").type


# ---------------------------------------------------------------------------------------------
# The whole evaluation on a fake LaMP-7 file (tiny model): files, keys, resume, report


@pytest.fixture
def fake_lamp(tmp_path):
    rng = np.random.default_rng(0)
    words = "omg love my cat dog work today lol tired happy sad rain sun coffee".split()
    qs, golds = [], []
    for i in range(504):
        prof = [" ".join(rng.choice(words, 6)) for _ in range(4)]
        tweet = " ".join(rng.choice(words, 7))
        qs.append(
            {
                "id": f"61{i}",
                "input": LAMP7_PROMPT + tweet,
                "profile": [{"id": f"61{i}_{k}", "text": t} for k, t in enumerate(prof)],
            }
        )
        golds.append({"id": f"61{i}", "output": tweet.upper().lower() + " !"})
    d = tmp_path / "lamp7"
    d.mkdir()
    (d / "dev_questions.json").write_text(json.dumps(qs))
    (d / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_7", "golds": golds}))
    return d


def test_run_evaluation_end_to_end(tmp_path, fake_lamp, tiny_model_dir, monkeypatch):
    # Two of each user's four history items held out: calibration and the marker directions need them.
    cfg = tiny_job_config(
        tiny_model_dir, **{"groups.n_groups": 2, "subspace.ccs_steps": 30, "synth.heldout_items": 2}
    )
    settings = EvalSettings(
        out_dir=str(tmp_path / "out"),
        workdir=str(tmp_path / "work"),
        lamp_dir=str(fake_lamp),
        tuning_users=(0, 4),
        reported_users=(500, 504),
        max_new_tokens=4,
        n_resamples=50,
        command="chameleon eval --test",
    )
    model_tok = load_model(cfg.model)
    reads: Counter[tuple[str, str]] = Counter()
    verified_get_bytes = VerifiedFiles.get_bytes

    def counting_get_bytes(self, relpath):
        reads[(self.run_id, relpath)] += 1
        return verified_get_bytes(self, relpath)

    monkeypatch.setattr(VerifiedFiles, "get_bytes", counting_get_bytes)
    res = run_evaluation(settings, cfg, model_and_tokenizer=model_tok, progress=False)
    # Every group edit and user shard of a run was read once, however many users it serves.
    edit_reads = {k: n for k, n in reads.items() if k[1].startswith(("groups/", "users/"))}
    assert any(k[1].startswith("groups/") for k in edit_reads) and any(
        k[1].startswith("users/") for k in edit_reads
    )
    assert set(edit_reads.values()) == {1}, edit_reads
    assert {"model", "n_users", "methods"} <= set(res)
    assert res["n_users"] == 4
    # `shuffled` needs a second group to take an edit from.
    several_groups = len(res["runs"]["groups_all"]) > 1
    # The residual controls need a run composed of residual parts; the default (whole edits) has none.
    residual_controls = {"swapped_residual", "random_residual"}
    expected = [m for m in METHODS if (m != "shuffled" or several_groups) and m not in residual_controls]
    assert list(res["methods"]) == expected
    assert "not run" in res["runs"]["residual_controls"]
    for m, e in res["methods"].items():
        for k in ("rouge1", "rougeL", "rouge1_ci95", "rougeL_ci95"):
            assert k in e
        if m != "base":
            assert "vs_base" in e
        if m != "rag":
            assert "vs_rag" in e
    assert res["methods"]["copy"]["rougeL"] > 0.5
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["base"]["rougeL"] == res["methods"]["base"]["rougeL"]
    preds = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(preds) == 4 * len(res["methods"])
    assert {p["position"] for p in preds} == {500, 501, 502, 503}
    assert all(p["group_id"] for p in preds if p["method"] in ("chameleon_group", "chameleon_unseen"))
    report = (out / "report.md").read_text()
    assert "copy" in report and "chameleon eval --test" in report and (out / "metric_by_method.png").is_file()
    parts = res["runs"]["marker_parts"]  # the default marker part, and how many reported users it reaches
    assert parts["markers"] == ["emoticon"] and set(parts["reported_users"]) == {"emoticon"}
    assert "- Marker parts (in `chameleon_group` and `chameleon_user`): emoticon at strength 0.25" in report
    # Issue 18: per-user vectors aligned with the users, no text, every figure recomputable from them.
    pu = saved["per_user"]
    assert pu["user_ids"] == [p["user_id"] for p in preds if p["method"] == "base"]
    assert len(pu["history_lower_start_share"]) == 4 and set(pu["methods"]) == set(res["methods"])
    # What each reported user's served rows add, as the run published it.
    assert sum(m == ["emoticon"] for m in pu["marker_parts"]) == parts["reported_users"]["emoticon"]
    assert all(m in ([], ["emoticon"]) for m in pu["marker_parts"]) and len(pu["marker_parts"]) == 4
    for m, e in pu["methods"].items():
        assert {"rougeL", "closeness", "attribution_rank", "lower_start"} <= set(e)
        assert all(len(v) == 4 for v in e.values()) and set(e["attribution_rank"]) <= {1, 2, 3, 4}
        assert np.mean(e["rougeL"]) == pytest.approx(res["methods"][m]["rougeL"])
    assert not any(p["gold"] in json.dumps(pu) for p in preds)
    assert recompute.compare(saved) == []
    assert "## Personalization, not format" in report and "| marker_transfer |" in report
    assert (
        f"{os.cpu_count()} CPU cores visible" in report and "shared CPU" not in report
    )  # measured, not assumed
    assert "Reported users: **4** (file positions 500..503, never used for tuning)" in report
    # A validation run (held-out tuning users) never reads as a report on never-used users.
    (out / "results.json").write_text(json.dumps({**saved, "phase": "validation (held-out tuning users)"}))
    validation_report = write_report(out).read_text()
    assert "**Validation run**" in validation_report and "never used for tuning" not in validation_report
    (out / "results.json").write_text(json.dumps(saved))

    # Resume: a second run reads every answer from the cache and the runs from the store.
    def no_generation(*a, **k):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(context, "generate_answers", no_generation)
    again = run_evaluation(settings, cfg, model_and_tokenizer=model_tok, progress=False)
    assert again["methods"] == res["methods"]


def test_ablations_and_report_on_tuning_users_only(tmp_path, fake_lamp, tiny_model_dir):
    cfg = tiny_job_config(tiny_model_dir, **{"groups.n_groups": 2, "subspace.ccs_steps": 30})
    settings = EvalSettings(
        out_dir=str(tmp_path / "out"),
        workdir=str(tmp_path / "work"),
        lamp_dir=str(fake_lamp),
        tuning_users=(0, 6),
        reported_users=(500, 502),
        max_new_tokens=3,
        n_resamples=50,
        methods=("copy", "base", "chameleon_group"),
        ablations=("alpha", "group_size", "unseen", "history"),
        history_users=(0, 3),
        select_on_tuning=True,
    )
    res = run_evaluation(settings, cfg, model_and_tokenizer=load_model(cfg.model), progress=False)
    out = tmp_path / "out"
    ab = json.loads((out / "ablations.json").read_text())
    assert ab["users"]["n_scored"] == 6 and ab["users"]["scored_positions"] == [0, 6]
    labels = {p["label"] for p in ab["points"]}
    assert {
        "default=default/group",
        "default=default/user",
        "alpha=0.5/group",
        "group_size=all/group",
        "assignment=history/group",
        "unseen=2-fold/unseen",
    } <= labels
    assert not ab["selected"]["label"].startswith("assignment")
    assert ab["history"]["n_users"] == 3 and {p["history_k"] for p in ab["history"]["points"]} == {
        1,
        3,
        5,
        "all",
    }
    assert ab["selected"] is not None
    if res["config"]["selected_on_tuning"]:
        assert "chameleon_group_default" in res["methods"]
    for f in ("metric_vs_alpha.png", "metric_vs_group_size.png", "metric_vs_history_size.png"):
        assert (out / f).is_file()
    assert "Ablations (tuning users only)" in (out / "report.md").read_text()


def test_select_never_picks_a_diagnostic_or_a_site_change():
    def pt(ablation, rouge_l, level="group"):
        return {
            "label": f"{ablation}/{level}",
            "ablation": ablation,
            "level": level,
            "rougeL": rouge_l,
            "overrides": {},
            "value": 1,
        }

    points = [
        pt("default", 0.30),
        pt("assignment", 0.40),
        pt("site", 0.50),
        pt("unseen", 0.45, "unseen"),
        pt("alpha", 0.35),
    ]
    assert ablations.select_setting(points)["label"] == "alpha/group"
    assert ablations.select_setting(points[:4])["label"] == "default"


def test_for_history_takes_the_group_of_the_nearest_history_centroid():
    a, b = object(), object()
    fit = runs.FittedEdits(
        user={},
        group_of={},
        group={"g000": a, "g001": b},
        group_sizes={"g000": 1, "g001": 1},
        group_ids=["g000", "g001"],
        history_centroids=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
    )
    assert fit.for_history(torch.tensor([[0.1, 2.0], [3.0, 0.2], [1.0, 0.9]])) == [b, a, a]


def test_positions_ablation_edits_every_position_at_weaker_scales():
    pts = [p for p in ablations.ablation_grid(("positions",)) if p.ablation == "positions"]
    assert [p.overrides["edit.alpha"] for p in pts] == [1.0, 0.5, 0.25]
    for p in pts:
        cfg = tiny_job_config("unused").with_overrides(p.overrides)
        assert cfg.edit.positions == "all" and cfg.edit.beta == cfg.edit.alpha and p.level == "group"
    assert not any(p.ablation == "positions" for p in ablations.ablation_grid(("alpha",)))


def test_eval_cli_flags_map_onto_settings_and_config():
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "eval",
            "--out",
            "o",
            "--methods",
            "base,rag",
            "--ablations",
            "all",
            "--alpha",
            "2",
            "--pairs-per-user",
            "6",
            "--reported-users",
            "600:700",
        ]
    )
    assert args.methods == ("base", "rag") and args.ablations == ABLATIONS
    cfg = eval_config(args)
    assert cfg.edit.alpha == 2.0 and cfg.synth.pairs_per_user == 6
    assert cfg.synth.answer_max_new_tokens == EVAL_SYNTH_DEFAULTS["synth.answer_max_new_tokens"]
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--out", "o", "--methods", "base,oracle"])
    settings = eval_settings(args)  # the evaluation's own settings come from their flag table too
    assert settings.out_dir == "o" and settings.methods == ("base", "rag") and settings.ablations == ABLATIONS
    assert settings.reported_users == (600, 700) and not settings.validation and not settings.use_ray
    assert settings.tuning_users == EvalSettings.model_fields["tuning_users"].default
    more = parser.parse_args(
        [
            "eval",
            "--out",
            "o",
            "--validation",
            "--ray",
            "--system-prompt",
            "none",
            "--seed",
            "3",
            "--rag-k",
            "5",
        ]
    )
    s2 = eval_settings(more)
    assert s2.validation and s2.use_ray and s2.system_prompt is None and s2.seed == 3 and s2.rag_k == 5
    with pytest.raises(ValueError, match="user range"):
        eval_settings(parser.parse_args(["eval", "--out", "o", "--tuning-users", "5"]))


def test_eval_help_gives_every_flag_a_help_and_its_default_and_examples():
    parser = argparse.ArgumentParser()
    text = add_eval_parser(parser.add_subparsers(dest="command")).format_help()
    options = text.split("\noptions:\n", 1)[1].split("\nexamples:\n", 1)[0]
    blocks = [" ".join(b.split()) for b in re.split(r"\n  (?=-)", options) if b.strip()]
    assert len(blocks) > 40
    for block in blocks:
        if block.startswith("-h, --help"):
            continue
        flag = block.split()[0]
        if flag == "--out":  # required: it has no default
            continue
        assert "default" in block, f"{flag} does not show its default: {block}"
    assert (
        "[methods; default: all]" in text and "[ablations; default: none]" in text and "default: 4]" in text
    )  # eval's own synthesis defaults
    assert "\nexamples:\n" in text and text.count("chameleon eval --out") >= 3


@pytest.mark.e2e  # a fresh interpreter
def test_building_the_parser_and_importing_the_package_stay_light():
    code = (
        "import argparse, sys\n"
        "import chameleon.evaluation\n"
        "from chameleon.evaluation.cli import add_eval_parser\n"
        "add_eval_parser(argparse.ArgumentParser().add_subparsers()).format_help()\n"
        "print('HEAVY', sorted(m for m in ('torch', 'ray', 'numpy', 'transformers', 'matplotlib', 'pyarrow') if m in sys.modules))\n"
        "from chameleon.evaluation import EvalSettings, run_evaluation, write_report\n"
        "print('LAZY', callable(run_evaluation) and callable(write_report) and EvalSettings.__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout and "LAZY EvalSettings" in out.stdout, out.stdout
    with pytest.raises(AttributeError):
        _ = chameleon.evaluation.no_such_name


def test_jobs_evaluate_is_chameleon_eval():
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "evaluate.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--reported-users" in out.stdout and "examples:" in out.stdout


def test_seed_partitions_reuses_the_same_users_synthesis(tiny_run, tmp_path):
    store, manifest, cfg, model_tok = tiny_run
    src_users = [json.loads(line) for line in (store.root.parent / "users.jsonl").read_text().splitlines()]
    extra = [{**u, "user_id": u["user_id"] + "-x"} for u in src_users[:3]]
    path = tmp_path / "more.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in src_users + extra))
    copied = runs.seed_partitions(store, "r1", "r2", path, cfg)
    assert copied == [0, 1, 2]  # 12 users in partitions of 4; the 4th partition holds new users
    m = run_local(str(path), store, "r2", cfg, model_and_tokenizer=model_tok, progress=False)
    assert m.counts.partitions_resumed == 3 and m.counts.users_mapped == 15
    a, _ = runs.read_run_tables(store, "r1")
    b, _ = runs.read_run_tables(store, "r2", [u["user_id"] for u in src_users])
    assert a.column("personalized").to_pylist() == b.column("personalized").to_pylist()
    with pytest.raises(ValueError, match="synth"):
        runs.seed_partitions(store, "r1", "r3", path, cfg.with_overrides({"synth.pairs_per_user": 5}))


@pytest.mark.slow
def test_synthesis_through_the_ray_job(tmp_path, fake_lamp, tiny_model_dir, ray_session):
    """`--ray`: the synthesis runs as the Ray job's map stage (the session's Ray), then the same evaluation."""
    cfg = tiny_job_config(tiny_model_dir, **{"groups.n_groups": 2, "subspace.ccs_steps": 30})
    settings = EvalSettings(
        out_dir=str(tmp_path / "out"),
        workdir=str(tmp_path / "work"),
        lamp_dir=str(fake_lamp),
        tuning_users=(0, 4),
        reported_users=(500, 504),
        max_new_tokens=3,
        n_resamples=50,
        methods=("copy", "base", "chameleon_group", "chameleon_unseen"),
        use_ray=True,
    )
    res = run_evaluation(settings, cfg, progress=False)
    assert res["n_users"] == 4 and "chameleon_unseen" in res["methods"]
    assert res["runs"]["synthesis"].startswith("lamp7-t0-4-r500-504")
