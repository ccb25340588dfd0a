"""Capture: last real token, the same under left/right padding and any batch size."""

from __future__ import annotations

import pytest
import torch
from tiny_models import embedded_tokenizer, tiny_llama

from chameleon.core.capture import capture
from chameleon.core.generation import chat_prompt

TEXTS = ["a", "a much longer text that needs padding around it, really", "mid length text here", "ok"]


@pytest.fixture(scope="module")
def setup():
    tok = embedded_tokenizer()
    return tiny_llama(tok, seed=1), tok


@pytest.mark.parametrize("site", ["mlp", "residual"])
def test_padding_side_and_batch_size_do_not_matter(setup, site):
    model, tok = setup
    texts = [chat_prompt(tok, t) + "answer" for t in TEXTS]
    tok.padding_side = "left"
    left = capture(model, tok, texts, [0, 2], site, batch_size=4)
    tok.padding_side = "right"
    right = capture(model, tok, texts, [0, 2], site, batch_size=4)
    tok.padding_side = "left"
    single = capture(model, tok, texts, [0, 2], site, batch_size=1)
    assert left.shape == (4, 2, 64)
    assert torch.allclose(left, right, atol=1e-4)
    assert torch.allclose(left, single, atol=1e-4)


def test_reads_the_module_output_at_the_last_token(setup):
    model, tok = setup
    text = chat_prompt(tok, TEXTS[1])
    enc = tok([text], return_tensors="pt", add_special_tokens=False)
    seen = {}
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    with torch.no_grad():
        model(**enc)
    handle.remove()
    got = capture(model, tok, [text], [1], "mlp")
    assert torch.allclose(got[0, 0], seen["out"][0, -1], atol=1e-5)


def test_mean_reduce_and_empty_input(setup):
    model, tok = setup
    mean = capture(model, tok, TEXTS, [1], "residual", reduce="mean")
    last = capture(model, tok, TEXTS, [1], "residual", reduce="last")
    assert mean.shape == last.shape and not torch.allclose(mean, last)
    assert capture(model, tok, [], [1], "mlp").shape == (0, 1, 64)
    with pytest.raises(ValueError):
        capture(model, tok, TEXTS, [1], "attention")
