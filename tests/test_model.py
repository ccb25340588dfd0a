"""Model access: the architecture table, layer lookup, loading errors, the embedded model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from chameleon.config import ModelConfig
from chameleon.core.model import (
    ARCHITECTURES,
    ModelNotAvailableError,
    decoder_layers,
    embedded_model_dir,
    hidden_size,
    layer_module,
    load_model,
    num_layers,
)


def test_architecture_table_covers_the_supported_families():
    for family in ("llama", "qwen2", "mistral", "phi3", "gemma", "gemma3_text", "gemma3"):
        assert family in ARCHITECTURES


@pytest.mark.parametrize(
    ("config", "layers_of", "mlp_name"),
    [
        (
            GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64),
            lambda m: m.transformer.h,
            "mlp",
        ),
        (
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=100,
            ),
            lambda m: m.model.layers,
            "mlp",
        ),
    ],
)
def test_each_layout_of_the_table_finds_its_layers_and_sites(config, layers_of, mlp_name):
    """One row per distinct layout: the table's layer path and MLP name reach the real modules."""
    model = AutoModelForCausalLM.from_config(config)
    layers = layers_of(model)
    assert num_layers(model) == len(layers) == 3
    assert layer_module(model, 1, "residual") is layers[1]
    assert layer_module(model, 2, "mlp") is getattr(layers[2], mlp_name)


def test_layers_and_sites_of_a_qwen2_model():
    cfg = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    assert num_layers(model) == 3 and hidden_size(model) == 32
    assert layer_module(model, 1, "mlp") is model.model.layers[1].mlp
    assert layer_module(model, -1, "residual") is model.model.layers[2]
    with pytest.raises(ValueError, match="out of range"):
        layer_module(model, 3, "mlp")
    with pytest.raises(ValueError, match="unknown site"):
        layer_module(model, 0, "attention")


def test_unknown_layout_gives_a_clear_error():
    with pytest.raises(ValueError, match="ARCHITECTURES"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_loading_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="cannot load model"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nothing-here")))


def test_local_model_loads_left_padded(tiny_model_dir):
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_embedded_model_is_converted_once_and_cached():
    first = embedded_model_dir()
    assert (first / "config.json").exists() and any(first.glob("*.safetensors"))
    assert embedded_model_dir() == first
