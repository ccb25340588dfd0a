"""Which model an artifact was made for: a fingerprint of the config and a weight sample.

Edits are only valid on the model they were computed on. A run records the fingerprint of its
model; serving and evaluation refuse a run whose fingerprint differs from the loaded model's.

The record and its comparison are read by the data layer, down to the Ray Data tasks that read a
job's input; only hashing a loaded model needs torch, so torch and the model helpers are imported
there, when a model is fingerprinted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


class ModelMismatchError(ValueError):
    """The artifact was computed on a different model than the one loaded."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Config fields that change with how a model is loaded, not with which model it is.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "attn_implementation",
        "quantization_config",
        "device_map",
        "architectures",
    }
)
_SAMPLE_ELEMENTS = 1 << 20
"""Per tensor at most this many elements are hashed (an evenly strided sample)."""


@dataclass(frozen=True)
class ModelFingerprint:
    model_id: str
    """How the model was named when loaded (informative: not compared)."""
    config_sha256: str
    """Hash of the architecture config without load-time fields."""
    weights_sha256: str
    """Hash of a deterministic sample of the weights (embedding and last decoder layer)."""
    hidden_size: int
    num_layers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFingerprint:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"model fingerprint lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in names})

    def describe(self) -> str:
        return (
            f"{self.model_id!r} (hidden size {self.hidden_size}, {self.num_layers} layers, "
            f"config {self.config_sha256[:12]}, weights {self.weights_sha256[:12]})"
        )


def _clean_config(obj: Any) -> Any:
    if isinstance(obj, dict):
        # Keys become strings (as in JSON) so int-keyed maps such as id2label hash the same after a reload.
        return {
            str(k): _clean_config(v)
            for k, v in obj.items()
            if not str(k).startswith("_") and str(k) not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(obj, (list, tuple)):
        return [_clean_config(v) for v in obj]
    return obj


def config_sha256(config: Any) -> str:
    """Hash of a transformers config (or dict) with sorted keys and no load-time fields."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(_clean_config(data), sort_keys=True, default=str, separators=(",", ":"))
    return _sha256(text.encode("utf-8"))


def _fingerprint_tensors(model: Any) -> list[tuple[str, Any]]:
    """The input embedding, every parameter of the last decoder layer, in a fixed order."""
    from chameleon.core.model import decoder_layers

    chosen: list[tuple[str, Any]] = []
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        chosen.append(("input_embeddings", embed.weight))
    try:
        last = decoder_layers(model)[-1]
        chosen.extend((f"last_layer.{n}", p) for n, p in last.named_parameters())
    except ValueError:
        # Unknown architecture: the last few parameters stand in for the last layer.
        chosen.extend(list(model.named_parameters())[-8:])
    if not chosen:
        raise ValueError("model has no parameters to fingerprint")
    return chosen


def weights_sha256(model: Any) -> str:
    """Hash of a strided sample of the input embedding and the last decoder layer.

    Values are rounded to bfloat16 before hashing, so one checkpoint loaded in float32 on a CPU
    and in bfloat16 on a GPU has one fingerprint (its edits are valid for both); any real change
    of weights (another seed, a fine-tune) changes far more than bfloat16 rounding hides. At most
    `_SAMPLE_ELEMENTS` values per tensor are read: cheap even for an 8B model.
    """
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in _fingerprint_tensors(model):
            if param.device.type == "meta":
                raise ValueError(f"cannot fingerprint {name}: its weights are not loaded (meta device)")
            flat = param.detach().reshape(-1)
            step = max(1, -(-flat.numel() // _SAMPLE_ELEMENTS))
            sample = flat[::step].to(torch.bfloat16).to("cpu").contiguous()
            h.update(f"{name}:{tuple(param.shape)}:{step};".encode())
            h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def fingerprint_model(model: Any, model_id: str) -> ModelFingerprint:
    """Identify a loaded causal LM: config hash, weight-sample hash, hidden size, layer count."""
    from chameleon.core.model import hidden_size, num_layers

    return ModelFingerprint(
        model_id=str(model_id),
        config_sha256=config_sha256(model.config),
        weights_sha256=weights_sha256(model),
        hidden_size=hidden_size(model),
        num_layers=num_layers(model),
    )


def check_compatible(
    manifest_fingerprint: Mapping[str, Any] | ModelFingerprint,
    fingerprint: ModelFingerprint,
    *,
    run_id: str | None = None,
) -> None:
    """Raise `ModelMismatchError` unless the artifact's model is the loaded one.

    `model_id` is not compared (one model may be loaded from a hub id or a local copy); the shape,
    config and weight hashes are.
    """
    made_for = (
        manifest_fingerprint
        if isinstance(manifest_fingerprint, ModelFingerprint)
        else ModelFingerprint.from_dict(manifest_fingerprint)
    )
    differences = [
        what
        for what, a, b in (
            ("hidden size", made_for.hidden_size, fingerprint.hidden_size),
            ("layer count", made_for.num_layers, fingerprint.num_layers),
            ("config", made_for.config_sha256, fingerprint.config_sha256),
            ("weights", made_for.weights_sha256, fingerprint.weights_sha256),
        )
        if a != b
    ]
    if differences:
        run = f" of run {run_id!r}" if run_id else ""
        raise ModelMismatchError(
            f"the artifacts{run} were made for model {made_for.describe()}, but the loaded model is "
            f"{fingerprint.describe()}; they differ in {', '.join(differences)}. "
            "Serve them with the model they were computed on, or recompute them for this model."
        )
