"""Chameleon on Ray: personalize an instruction-tuned LLM for many users without fine-tuning.

The public API, imported lazily so `import chameleon` stays light (no torch, no Ray):

    from chameleon import ChameleonConfig, load_model, run_local, PublishedRun, open_store

Layers (each may import only those before it): `core` (torch + transformers: model, capture,
synthesis, subspaces, edits, generation) ← `data` (records, storage, artifacts, run layout) ←
`job` (stages and the two drivers) ← `evaluation`; `serving` uses `core` and `data` only.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "ChameleonConfig": "chameleon.config",
    "load_model": "chameleon.core.model",
    "Edit": "chameleon.core.edit",
    "EditBank": "chameleon.core.edit",
    "fit_subspaces": "chameleon.core.subspace",
    "generate_answers": "chameleon.core.generation",
    "open_store": "chameleon.data.storage",
    "PublishedRun": "chameleon.data.published",
    "RunReader": "chameleon.data.artifacts",
    "run_local": "chameleon.job.local",
    "run_ray_job": "chameleon.job.ray_job",
    "ServeConfig": "chameleon.serving.config",
    "build_app": "chameleon.serving.app",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chameleon' has no attribute {name!r}")
