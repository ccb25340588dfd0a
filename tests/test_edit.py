"""EditBank: per-row edits in one batch, identity row, removal, generate() with the KV cache."""

from __future__ import annotations

import pytest
import torch
from tiny_models import embedded_tokenizer, tiny_llama

from chameleon.core.edit import Edit, EditBank, edit_rows
from chameleon.core.generation import chat_prompt, generate

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, seed=0)


def random_edit(seed: int, d: int = 64, layers=LAYERS, rank: int = 2, site: str = "mlp") -> Edit:
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(len(layers), d, rank, generator=g))[0].transpose(1, 2)
    N = torch.randn(len(layers), d, generator=g)
    N = N / N.norm(dim=-1, keepdim=True)
    mu = 0.1 * torch.randn(len(layers), d, generator=g)
    return Edit(layers=list(layers), theta_p=P, theta_n=N, mean=mu, site=site)


def batch(tok, texts):
    tok.padding_side = "left"
    return tok(
        [chat_prompt(tok, t) for t in texts], return_tensors="pt", padding=True, add_special_tokens=False
    )


TEXTS = ["hello there", "write a tweet about rain", "what is two plus two", "good morning!!"]


def test_edit_rows_matches_the_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    P = torch.linalg.qr(torch.randn(2, 8, 2))[0].transpose(1, 2)
    N = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    mu = torch.randn(2, 8)
    alpha, beta = torch.tensor([1.0, 0.5]), torch.tensor([1.0, 2.0])
    got = edit_rows(x, P, N, mu, alpha, beta)
    for b in range(2):
        for t in range(3):
            v = x[b, t].clone()
            v = v + alpha[b] * sum(((v - mu[b]) @ P[b, r]) * P[b, r] for r in range(2))
            v = v - beta[b] * ((v - mu[b]) @ N[b]) * N[b]
            assert torch.allclose(got[b, t], v, atol=1e-5)


def test_full_rejection_removes_the_neutral_component():
    x = torch.randn(1, 1, 8)
    N = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    out = edit_rows(x, torch.zeros(1, 1, 8), N, torch.zeros(1, 8), torch.ones(1), torch.ones(1))
    assert abs(float(out[0, 0] @ N[0])) < 1e-5


def test_mixed_batch_equals_each_edit_alone(model, tok):
    edits = [random_edit(s) for s in range(3)]
    bank = EditBank(64, LAYERS, max_rank=2)
    rows = bank.add_many(edits, alpha=2.0, beta=1.0)
    enc = batch(tok, TEXTS)
    mixed_rows = [rows[0], 0, rows[2], rows[1]]
    with torch.no_grad(), bank.apply(model, mixed_rows):
        mixed = model(**enc).logits[:, -1]
    for i, r in enumerate(mixed_rows):
        with torch.no_grad(), bank.apply(model, [r] * len(TEXTS)):
            alone = model(**enc).logits[i, -1]
        assert (mixed[i] - alone).abs().max() <= 1e-4


def test_identity_row_and_zero_scale_are_bit_identical(model, tok):
    enc = batch(tok, TEXTS)
    with torch.no_grad():
        base = model(**enc).logits
    bank = EditBank(64, LAYERS, max_rank=2)
    r_zero = bank.add(random_edit(5), alpha=0.0, beta=0.0)
    r_edit = bank.add(random_edit(6), alpha=1.0, beta=1.0)
    with torch.no_grad(), bank.apply(model, [0, r_zero, 0, r_edit]):
        out = model(**enc).logits
    assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1]) and torch.equal(out[2], base[2])
    assert not torch.equal(out[3, -1], base[3, -1])


def test_edit_changes_only_the_last_position_by_default(model, tok):
    enc = batch(tok, TEXTS[:1])
    bank = EditBank(64, LAYERS, max_rank=2)
    r = bank.add(random_edit(7), alpha=3.0)
    with torch.no_grad():
        base = model(**enc).logits
        with bank.apply(model, [r]):
            out = model(**enc).logits
    assert torch.equal(out[0, :-1], base[0, :-1])
    assert not torch.equal(out[0, -1], base[0, -1])
    bank_all = EditBank(64, LAYERS, max_rank=2, positions="all")
    r = bank_all.add(random_edit(7), alpha=3.0)
    with torch.no_grad(), bank_all.apply(model, [r]):
        out_all = model(**enc).logits
    assert not torch.equal(out_all[0, -2], base[0, -2])


def test_hooks_are_removed_after_the_block(model, tok):
    enc = batch(tok, TEXTS[:2])
    bank = EditBank(64, LAYERS, max_rank=2)
    r = bank.add(random_edit(8), alpha=3.0)
    with torch.no_grad():
        before = model(**enc).logits
        with bank.apply(model, [r, r]):
            pass
        after = model(**enc).logits
    assert torch.equal(before, after)
    with pytest.raises(RuntimeError):
        with bank.apply(model, [r, r]):
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)


def test_generate_with_kv_cache_matches_per_row_generation(model, tok):
    bank = EditBank(64, LAYERS, max_rank=2)
    rows = bank.add_many([random_edit(10), random_edit(11)], alpha=4.0)
    prompts = [chat_prompt(tok, t) for t in TEXTS[:3]]
    mixed = generate(model, tok, prompts, max_new_tokens=8, bank=bank, rows=[rows[0], 0, rows[1]])
    alone = [
        generate(model, tok, [prompts[0]], max_new_tokens=8, bank=bank, rows=[rows[0]])[0],
        generate(model, tok, [prompts[1]], max_new_tokens=8)[0],
        generate(model, tok, [prompts[2]], max_new_tokens=8, bank=bank, rows=[rows[1]])[0],
    ]
    assert mixed == alone
    plain = generate(model, tok, prompts, max_new_tokens=8)
    assert mixed[1] == plain[1]
    assert mixed[0] != plain[0] or mixed[2] != plain[2]


def test_residual_site_and_validation(model, tok):
    bank = EditBank(64, LAYERS, site="residual", max_rank=2)
    r = bank.add(random_edit(12, site="residual"), alpha=2.0)
    enc = batch(tok, TEXTS[:1])
    with torch.no_grad():
        base = model(**enc).logits
        with bank.apply(model, [r]):
            out = model(**enc).logits
    assert not torch.equal(out[0, -1], base[0, -1])
    with pytest.raises(ValueError, match="site"):
        bank.add(random_edit(13, site="mlp"))
    with pytest.raises(ValueError, match="not one of this bank"):
        bank.add(random_edit(14, layers=[0, 1], site="residual"))
    with pytest.raises(IndexError):
        with bank.apply(model, [99]):
            pass
    with pytest.raises(ValueError, match="non-finite"):
        e = random_edit(15)
        Edit(layers=e.layers, theta_p=e.theta_p, theta_n=e.theta_n * float("nan"), mean=e.mean)


def test_edit_tensors_round_trip():
    e = random_edit(20)
    back = Edit.from_tensors(e.to_tensors())
    assert back.layers == e.layers and torch.equal(back.theta_p, e.theta_p) and torch.equal(back.mean, e.mean)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_bound_edits_equal_apply_and_skip_unused_layers(model, tok, positions):
    bank = EditBank(64, [0, 1, 2, 3], max_rank=2, positions=positions)
    rows = bank.add_many(
        [random_edit(30, layers=[1, 2]), random_edit(31, layers=[2]), random_edit(32, layers=[0, 3])]
    )
    enc = batch(tok, TEXTS)
    for batch_rows in ([rows[0], 0, rows[1], rows[2]], [0, rows[1], 0, rows[1]]):
        bound = bank.bind(batch_rows)
        with torch.no_grad():
            with bank.apply(model, batch_rows):
                want = model(**enc).logits
            with bound.apply(model):  # reused across calls, as a decode loop does
                first = model(**enc).logits
            with bound.apply(model):
                second = model(**enc).logits
        assert torch.equal(first, want) and torch.equal(second, want)
    assert sorted(bank.bind([0, rows[1]]).slots) == [2], "layers no row edits get no hook"


def steer_edit(seed: int, d: int = 64, layers=LAYERS, scale: float = 3.0, renorm: bool = False) -> Edit:
    base = random_edit(seed, d, layers)
    g = torch.Generator().manual_seed(seed + 100)
    steer = scale * torch.nn.functional.normalize(torch.randn(len(layers), d, generator=g), dim=-1)
    return Edit(
        layers=base.layers,
        theta_p=base.theta_p,
        theta_n=base.theta_n,
        mean=base.mean,
        steer=steer,
        renorm=renorm,
    )


def test_additive_and_norm_preserving_forms_follow_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    zeros_p, zeros = torch.zeros(2, 1, 8), torch.zeros(2, 8)
    steer = torch.randn(2, 8)
    alpha = torch.tensor([1.0, 0.5])
    added = edit_rows(x, zeros_p, zeros, zeros, alpha, torch.ones(2), steer, torch.tensor([False, False]))
    assert torch.allclose(added, x + alpha[:, None, None] * steer[:, None, :], atol=1e-6)
    kept = edit_rows(x, zeros_p, zeros, zeros, alpha, torch.ones(2), steer, torch.tensor([True, True]))
    assert torch.allclose(kept.norm(dim=-1), x.norm(dim=-1), atol=1e-4)
    assert not torch.allclose(kept, x)


def test_edit_forms_round_trip_and_mix_in_one_batch(model, tok):
    proj, add, keep = random_edit(1), steer_edit(2), steer_edit(3, renorm=True)
    assert (proj.form, add.form, keep.form) == ("projection", "additive", "norm_preserving")
    back = Edit.from_tensors(keep.to_tensors())
    assert back.form == "norm_preserving" and torch.equal(back.steer, keep.steer)
    bank = EditBank(64, LAYERS)
    rows = bank.add_many([proj, add, keep])
    enc = batch(tok, TEXTS[:4])
    with torch.no_grad():
        with bank.apply(model, [rows[0], rows[1], rows[2], 0]):
            mixed = model(**enc).logits[:, -1]
        for i, r in enumerate(rows):
            with bank.apply(model, [r] * 4):
                alone = model(**enc).logits[:, -1]
            assert torch.allclose(mixed[i], alone[i], atol=1e-4), i
        plain = model(**enc).logits[:, -1]
    assert torch.equal(mixed[3], plain[3])
    assert ((mixed[:3] - plain[:3]).abs().amax(-1) > 1e-4).all()


def test_recorded_change_ratio_matches_the_steer_length(model, tok):
    edit = steer_edit(4, scale=2.0)
    bank = EditBank(64, LAYERS)
    row = bank.add(edit)
    bound = bank.bind([row] * 2)
    ratios = bound.record_change()
    with torch.no_grad(), bound.apply(model):
        model(**batch(tok, TEXTS[:2]))
    assert set(ratios) == set(LAYERS) and all(len(v) == 1 and v[0] > 0 for v in ratios.values())
