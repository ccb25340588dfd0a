"""Self-calibration: teacher-forced scoring equals generation's edit rule; strength 0 is the floor."""

from __future__ import annotations

import pytest
import torch
from tiny_models import embedded_tokenizer, tiny_llama

from chameleon.core.calibration import (
    UnitItems,
    answer_nll,
    choose,
    encode_answers,
    nll_curve,
    steering_edit,
    unit_curves,
)
from chameleon.core.edit import EditBank
from chameleon.core.generation import chat_prompt


@pytest.fixture(scope="module")
def setup():
    tok = embedded_tokenizer()
    return tiny_llama(tok, layers=3), tok


PROMPTS = ["rewrite: the weather is nice", "rewrite: i am at home now"]
ANSWERS = ["omg weather is sooo nice!!", "home at last lol"]


def test_teacher_forced_edit_equals_incremental_decoding_with_the_last_position_rule(setup):
    model, tok = setup
    prompts = [chat_prompt(tok, p) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    edit = steering_edit(1, torch.randn(64, generator=g), 5.0, 0.8, site="residual", renorm=False)
    bank = EditBank(64, [1], site="residual", max_rank=1)
    row = bank.add(edit)
    ids, attention, answer_mask, first = encode_answers(tok, prompts[:1], ANSWERS[:1])
    with torch.no_grad():
        with bank.bind([row]).from_position(first - 1).apply(model):
            forced = model(input_ids=ids, attention_mask=attention).logits[0]
        # Incremental: prefill the prompt, then feed the answer one token at a time (edit at the last position).
        p = int(first[0])
        with bank.apply(model, [row]):
            out = model(input_ids=ids[:, :p], use_cache=True)
            steps = [out.logits[0, -1]]
            cache = out.past_key_values
            for t in range(p, ids.shape[1] - 1):
                out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[0, -1])
    incremental = torch.stack(steps)
    assert torch.allclose(forced[p - 1 : ids.shape[1] - 1], incremental, atol=1e-4)


def test_nll_curve_has_the_base_and_every_candidate_and_choose_never_loses_to_base(setup):
    model, tok = setup
    prompts = [chat_prompt(tok, p) for p in PROMPTS]
    base = answer_nll(model, tok, prompts, ANSWERS)
    g = torch.Generator().manual_seed(1)
    change: dict[str, float] = {}
    curve = nll_curve(
        model,
        tok,
        prompts,
        ANSWERS,
        directions=torch.randn(2, 64, generator=g),
        norms=torch.tensor([3.0, 3.0]),
        layers=[0, 2],
        strengths=[0, 0.5, 2.0],
        site="residual",
        change=change,
    )
    assert set(curve) == {"base", "0:0.5", "0:2", "2:0.5", "2:2"}
    # ‖Δh‖/‖h‖ is logged per candidate and grows with the strength at a layer.
    assert set(change) == set(curve) - {"base"} and all(v > 0 for v in change.values())
    assert change["0:2"] > change["0:0.5"] and change["2:2"] > change["2:0.5"]
    assert curve["base"] == pytest.approx(base)
    assert len({round(v, 6) for v in curve.values()}) > 1  # the edits do change the likelihood
    choice = choose(curve)
    assert choice.nll <= curve["base"]
    assert choice.nll == min(curve.values())
    assert (choice.strength == 0) == (choice.nll == curve["base"])


def test_choose_keeps_the_base_model_when_no_candidate_helps():
    choice = choose({"base": 2.0, "3:0.1": 2.5, "4:0.2": 2.0})
    assert not choice.active and choice.layer == -1 and choice.nll == 2.0
    choice = choose({"base": 2.0, "3:0.1": 1.5, "4:0.2": 1.9})
    assert choice.active and (choice.layer, choice.strength) == (3, 0.1)
    assert not choose({"base": 2.0, "3:0.1": 1.99}, min_gain=0.05).active


def test_answer_nll_is_the_mean_token_nll_of_the_answers_only(setup):
    model, tok = setup
    prompts = [chat_prompt(tok, p) for p in PROMPTS]
    ids, attention, answer_mask, _ = encode_answers(tok, prompts, ANSWERS)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
    token_nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    expected = float(token_nll[answer_mask[:, 1:]].mean())
    assert answer_nll(model, tok, prompts, ANSWERS) == pytest.approx(expected, rel=1e-4)
    assert answer_nll(model, tok, prompts, ANSWERS, batch_size=1) == pytest.approx(expected, rel=1e-4)


def _full_forward_nll(model, tok, prompts, answers, bank, row):
    """Mean answer-token NLL and ‖Δh‖/‖h‖ from one forward over whole sequences (no prefix reuse)."""
    ids, attention, answer_mask, first = encode_answers(tok, prompts, answers)
    with torch.no_grad():
        bound = bank.bind([row] * len(ids)).from_position(first - 1)
        ratios = bound.record_change()
        with bound.apply(model):
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0][answer_mask[:, 1:]].mean()
    return float(nll), [r for values in ratios.values() for r in values]


def test_candidates_share_the_prompt_prefix_and_score_as_whole_sequences(setup):
    """The positions before every row's edit run once per batch, not once per candidate, and
    each candidate's NLL and change ratio are those of a forward over the whole sequences."""
    model, tok = setup
    # Prompts of different lengths and answers of different lengths: the shared prefix is cut
    # before the earliest edit of the batch.
    prompts = [
        chat_prompt(tok, p) for p in [*PROMPTS, "rewrite: a much longer prompt than the others, really"]
    ]
    answers = [*ANSWERS, "ok"]
    g = torch.Generator().manual_seed(2)
    layers, strengths = [0, 2], [0.5, 2.0]
    directions, norms = torch.randn(2, 64, generator=g), torch.tensor([3.0, 4.0])
    positions: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: positions.append(args[0].numel())
    )
    try:
        change: dict[str, float] = {}
        curve = nll_curve(model, tok, prompts, answers, directions=directions, norms=norms, layers=layers,
                          strengths=strengths, site="residual", change=change)  # fmt: skip
    finally:
        handle.remove()
    ids, _, _, first = encode_answers(tok, prompts, answers)
    B, T, cut = ids.shape[0], ids.shape[1], int(first.min()) - 1
    # One prefix pass, then base + 4 candidates over the suffix only (a full forward each: 5 * B * T).
    assert positions == [B * cut] + [B * (T - cut)] * 5
    for i, layer in enumerate(layers):
        for s in strengths:
            bank = EditBank(64, layers, site="residual", max_rank=1)
            unit = directions[i] / directions[i].norm()
            row = bank.add(
                steering_edit(layer, unit, s * float(norms[i]), 1.0, site="residual", renorm=False)
            )
            nll, ratios = _full_forward_nll(model, tok, prompts, answers, bank, row)
            assert curve[f"{layer}:{s:g}"] == pytest.approx(nll, abs=1e-5)
            assert change[f"{layer}:{s:g}"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert curve["base"] == pytest.approx(
        _full_forward_nll(model, tok, prompts, answers, EditBank(64, [0]), 0)[0], abs=1e-5
    )


def test_unit_curves_in_shared_batches_equal_each_units_own_curve(setup):
    """Many units' candidates scored in shared batches (each answer under its own unit's row, a
    bank of two units at a time) give each unit the curve `nll_curve` gives it alone, with and
    without an offset under every candidate."""
    model, tok = setup
    g = torch.Generator().manual_seed(3)
    texts = [*ANSWERS, "ok", "yes!! totally", "nope", "the end"]
    units = [
        UnitItems(torch.randn(64, generator=g), 2.0 + k, [chat_prompt(tok, p) for p in PROMPTS[: 1 + k % 2]],
                  texts[k : k + 1 + k % 2])
        for k in range(5)
    ]  # fmt: skip
    for offset in (None, torch.randn(64, generator=g)):
        curves = unit_curves(model, tok, units, layer=1, strengths=[0.0, 0.5, 2.0], site="residual",
                             offset=offset, batch_size=3, units_per_bank=2)  # fmt: skip
        assert len(curves) == len(units)
        for u, curve in zip(units, curves, strict=True):
            alone = nll_curve(model, tok, u.prompts, u.answers, directions=u.direction[None],
                              norms=torch.tensor([u.norm]), layers=[1], strengths=[0.0, 0.5, 2.0],
                              site="residual", offset=offset)  # fmt: skip
            assert curve.keys() == alone.keys() == {"base", "1:0.5", "1:2"}
            for key in alone:
                assert curve[key] == pytest.approx(alone[key], abs=1e-5), key
        # The units differ, so a unit scored under another unit's row would show.
        assert len({round(c["1:2"], 4) for c in curves}) == len(units)
