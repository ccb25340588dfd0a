"""Shared and personal parts of an edit (job.compose, `edit.composition: residual`), end to end on
the in-process job with the tiny model: the served rows are global + residuals, the artifacts keep
the parts, calibration picks the global first and each residual on top of it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_job_config

from chameleon.core.calibration import answer_nll, nll_curve, steering_edit
from chameleon.core.edit import EditBank
from chameleon.core.generation import chat_prompt
from chameleon.data.artifacts import RunReader
from chameleon.data.published import PublishedRun
from chameleon.dev.demo import write_example_users
from chameleon.evaluation.residuals import has_parts, residual_edits
from chameleon.job.compose import residual_unit
from chameleon.job.local import run_local

SETTINGS = {
    "synth.pair_source": "style",
    "edit.composition": "residual",
    "synth.heldout_items": 2,
    "synth.reference_items": 1,
    "synth.shared_pairs": 2,
    "edit.user_calibration_items": 2,
}


@pytest.fixture(scope="module")
def residual_run(tmp_path_factory, tiny_model_dir):
    from chameleon.data.storage import LocalStore

    d = tmp_path_factory.mktemp("residual")
    users = write_example_users(d / "users.jsonl")
    store = LocalStore(d / "store")
    manifest = run_local(
        str(users), store, "res-1", tiny_job_config(tiny_model_dir, **SETTINGS), progress=False
    )
    return PublishedRun(RunReader(store, "res-1")), manifest


def test_residual_unit_is_the_unit_difference_and_zero_when_equal():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(residual_unit(a, b), torch.tensor([1.0, -1.0]) / 2**0.5)
    assert torch.equal(residual_unit(a, a.clone()), torch.zeros(2))


def test_served_rows_are_the_sum_of_the_kept_parts(residual_run):
    run, manifest = residual_run
    parts = manifest.edit_parts
    assert parts["composition"] == "residual" and parts["global_from"] == "shared_pairs"
    assert parts["global_calibration"]["curve"]["base"] > 0  # the global edit was calibrated
    layer = parts["layer"]
    shared = None
    for gid in run.group_ids:
        edit, p = run.group_edit(gid), run.group_parts(gid)
        assert edit.layers == [layer]  # one composed row of one layer
        assert torch.allclose(edit.steer, p["global_steer"] + p["group_steer"], atol=1e-6)
        if shared is not None:
            assert torch.equal(p["global_steer"], shared)  # one global part for every group
        shared = p["global_steer"]
    with_own = 0
    for uid, row in run.assignments().items():
        own = run.user_part(uid)
        if own is None:
            continue
        with_own += 1
        group = run.group_edit(row["group_id"]).steer
        assert torch.allclose(run.user_edit(uid).steer, group + own, atol=1e-6)
    assert with_own > 0


def test_group_residuals_differ_between_groups(residual_run):
    run, _ = residual_run
    residuals = [run.group_parts(g)["group_steer"][0] for g in run.group_ids]
    active = [r for r in residuals if float(r.norm()) > 0]
    if len(active) < 2:
        pytest.skip("calibration kept fewer than two group residuals on the tiny model")
    cos = torch.nn.functional.cosine_similarity(active[0], active[1], dim=0)
    assert float(cos) < 0.999


def test_controls_keep_layer_and_norm_and_change_the_direction(residual_run):
    run, _ = residual_run
    assert has_parts(run)
    ids = sorted(run.assignments())
    gids = [run.user_group(u) for u in ids]
    out = residual_edits(run, ids, gids, seed="0")
    for i, u in enumerate(ids):
        shared = run.group_parts(gids[i])["global_steer"]
        own = run.user_part(u)
        personal = run.group_parts(gids[i])["group_steer"] + (own if own is not None else 0)
        assert torch.allclose(out["chameleon_global"][i].steer, shared)
        for name in ("swapped_residual", "random_residual"):
            e = out[name][i]
            assert e.layers == run.group_edit(gids[i]).layers
            delta = e.steer - shared
            if float(personal.norm()) > 0 and float(delta.norm()) > 0:
                assert abs(float(delta.norm()) - float(personal.norm())) < 1e-4
                assert not torch.allclose(delta, personal)
    again = residual_edits(run, ids, gids, seed="0")
    assert all(
        torch.equal(a.steer, b.steer)
        for a, b in zip(out["random_residual"], again["random_residual"], strict=True)
    )


def test_an_offset_is_the_floor_of_a_residual_calibration(tiny_model_dir):
    from chameleon.config import ModelConfig
    from chameleon.core.model import load_model

    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    d = model.config.hidden_size
    prompts = [chat_prompt(tok, "Paraphrase: I am tired."), chat_prompt(tok, "Paraphrase: Good game.")]
    answers = ["im sooo tired lol", "GOOD GAME!!!"]
    g = torch.Generator().manual_seed(0)
    offset, direction = torch.randn(d, generator=g), torch.randn(1, d, generator=g)
    curve = nll_curve(model, tok, prompts, answers, directions=direction, norms=torch.tensor([3.0]),
                      layers=[1], strengths=[0.5], site="residual", offset=offset)  # fmt: skip
    bank = EditBank(d, [1], site="residual", max_rank=1)
    only = bank.add(steering_edit(1, offset, float(offset.norm()), 1.0, site="residual", renorm=False))
    both_vec = offset + 0.5 * 3.0 * direction[0] / direction[0].norm()
    both = bank.add(steering_edit(1, both_vec, float(both_vec.norm()), 1.0, site="residual", renorm=False))
    assert curve["base"] == pytest.approx(
        answer_nll(model, tok, prompts, answers, bank=bank, row=only), abs=1e-5
    )
    assert curve["1:0.5"] == pytest.approx(
        answer_nll(model, tok, prompts, answers, bank=bank, row=both), abs=1e-5
    )
    assert curve["base"] != pytest.approx(answer_nll(model, tok, prompts, answers), abs=1e-6)
    with pytest.raises(ValueError, match="one layer"):
        nll_curve(model, tok, prompts, answers, directions=torch.randn(2, d), norms=torch.ones(2), layers=[1, 2],
                  strengths=[0.5], site="residual", offset=offset)  # fmt: skip
