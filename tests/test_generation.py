"""The one way to generate with per-row edits: rows keep their own edit, order and RNG are kept."""

from __future__ import annotations

import pytest
import torch
from tiny_models import embedded_tokenizer, tiny_llama

from chameleon.config import EditConfig
from chameleon.core.edit import Edit
from chameleon.core.generation import bank_for_edits, chat_prompt, distinct_edits, generate, generate_answers


@pytest.fixture(scope="module")
def setup():
    tok = embedded_tokenizer()
    return tiny_llama(tok, layers=3), tok


def _edit(d: int, seed: int) -> Edit:
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.functional.normalize(torch.randn(2, 1, d, generator=g), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1)
    return Edit(layers=[0, 1], theta_p=p, theta_n=n, mean=5 * torch.randn(2, d, generator=g), site="mlp")


def test_distinct_edits_by_identity():
    d = 8
    a, b = _edit(d, 0), _edit(d, 1)
    unique, index = distinct_edits([None, a, b, a, None])
    assert unique[0] is a and unique[1] is b and len(unique) == 2
    assert index == [-1, 0, 1, 0, -1]


def test_each_row_gets_its_own_edit_in_input_order(setup):
    model, tok = setup
    d = model.config.hidden_size
    e1, e2 = _edit(d, 0), _edit(d, 1)
    messages = [f"message number {i} " + "word " * (i % 3) for i in range(6)]
    edits = [None, e1, e2, e1, None, e2]
    cfg = EditConfig(alpha=4.0)
    mixed = generate_answers(model, tok, messages, edits=edits, edit_cfg=cfg, max_new_tokens=5, batch_size=4)
    plain = generate_answers(model, tok, messages, max_new_tokens=5, batch_size=4)
    # Each row equals the row generated alone with the same edit (or none).
    for i, e in enumerate(edits):
        alone = generate_answers(model, tok, [messages[i]], edits=[e], edit_cfg=cfg, max_new_tokens=5)
        assert mixed[i] == alone[0], i
    assert mixed[0] == plain[0] and mixed[4] == plain[4]
    assert any(mixed[i] != plain[i] for i in (1, 2, 3, 5))  # the edits do change answers


def test_generation_leaves_the_callers_rng_and_tokenizer_alone(setup):
    model, tok = setup
    side = tok.padding_side = "right"
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    prompts = [chat_prompt(tok, "hello there"), chat_prompt(tok, "hi")]
    first = generate(model, tok, prompts, max_new_tokens=4, temperature=1.0, seed=7)
    assert torch.equal(torch.rand(3), expected)  # the global RNG stream is untouched
    assert tok.padding_side == side
    assert (
        generate(model, tok, prompts, max_new_tokens=4, temperature=1.0, seed=7) == first
    )  # seeded per call


def test_bank_refuses_mixed_sites_and_empty_lists(setup):
    model, _ = setup
    d = model.config.hidden_size
    a = _edit(d, 0)
    b = Edit(layers=a.layers, theta_p=a.theta_p, theta_n=a.theta_n, mean=a.mean, site="residual")
    with pytest.raises(ValueError, match="share a site"):
        bank_for_edits(model, [a, b], EditConfig())
    with pytest.raises(ValueError, match="at least one edit"):
        bank_for_edits(model, [], EditConfig())
