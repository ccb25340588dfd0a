"""Model fingerprints: the same model under any load path matches, another model does not."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_llama
from transformers import AutoModelForCausalLM

from chameleon.core.fingerprint import ModelMismatchError, check_compatible, fingerprint_model


def test_fingerprint_identifies_the_model(tmp_path):
    model = random_llama(0)
    fp = fingerprint_model(model, "tiny-0")
    assert (fp.hidden_size, fp.num_layers) == (64, 2)
    # The same weights saved and reloaded (also in bfloat16, as on a GPU) are the same model.
    model.save_pretrained(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        check_compatible(fp.to_dict(), fingerprint_model(reloaded, str(tmp_path)))
    assert fingerprint_model(random_llama(0), "again") == fp.__class__(
        **{**fp.to_dict(), "model_id": "again"}
    )


def test_fingerprint_mismatch_is_refused():
    made_with = fingerprint_model(random_llama(0), "tiny-seed-0")
    other = fingerprint_model(random_llama(1), "tiny-seed-1")
    assert other.config_sha256 == made_with.config_sha256 and other.weights_sha256 != made_with.weights_sha256
    with pytest.raises(ModelMismatchError) as info:
        check_compatible(made_with.to_dict(), other)
    message = str(info.value)
    assert "'tiny-seed-0'" in message and "'tiny-seed-1'" in message and "weights" in message

    deeper = fingerprint_model(random_llama(0, layers=3), "tiny-3-layers")
    with pytest.raises(ModelMismatchError, match="layer count, config"):
        check_compatible(made_with.to_dict(), deeper)
