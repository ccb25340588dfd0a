"""`chameleon.serving.sampling`: a request's SamplingParams, made concrete by the replica."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_models import embedded_tokenizer, tiny_llama

from chameleon.serving.decoder import GenItem
from chameleon.serving.sampling import NEUTRAL, SamplingParams, model_sampling_defaults


def test_unset_settings_come_from_the_model_then_the_neutral_values():
    asked = SamplingParams(temperature=0.5, top_k=-1, min_tokens=50)
    got = asked.resolved({"temperature": 0.9, "top_p": 0.8}, max_tokens=16)
    assert got.temperature == 0.5, "the request's own value wins over the model's"
    assert got.top_p == 0.8, "the model's generation config fills what the request left unset"
    assert (got.min_p, got.repetition_penalty) == (NEUTRAL["min_p"], NEUTRAL["repetition_penalty"])
    assert got.top_k == 0, "-1 (all tokens, vLLM's spelling) is 0 (off)"
    assert got.max_tokens == 16 and got.min_tokens == 16, "min_tokens never past max_tokens"
    assert got.is_resolved and not asked.is_resolved
    assert SamplingParams().resolved({}, 4).temperature == 1.0, "OpenAI's default temperature"


def test_only_resolved_settings_reach_the_engine():
    with pytest.raises(ValueError, match="resolved"):
        GenItem([1, 2], SamplingParams(max_tokens=4))
    GenItem([1, 2], SamplingParams().resolved({}, 4))


def test_plain_is_greedy_without_logits_processing():
    greedy = SamplingParams(temperature=0.0).resolved({}, 4)
    assert greedy.plain
    assert not dataclasses.replace(greedy, presence_penalty=0.5).plain
    assert not dataclasses.replace(greedy, min_tokens=1).plain
    assert not SamplingParams().resolved({}, 4).plain


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


def test_model_defaults_come_from_the_generation_config():
    from transformers import GenerationConfig

    model = tiny_llama(embedded_tokenizer())
    model.generation_config = GenerationConfig(temperature=0.3, top_k=7, do_sample=True)
    assert model_sampling_defaults(model) == {"temperature": 0.3, "top_k": 7}
    model.generation_config = GenerationConfig()
    assert model_sampling_defaults(model) == {}
