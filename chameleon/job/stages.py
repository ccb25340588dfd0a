"""The job's stages as plain functions: choose the captured layers, map a partition, reduce.

Both drivers call exactly these: the in-process one (`chameleon.job.local`) and the Ray job
(`chameleon.job.ray_job`, which runs `process_partition` inside actors). Nothing here imports Ray.
The concerns live in their own modules: the Arrow tables at the boundary (`job.tables`), grouping
with the privacy floor (`job.grouping`) and the reduce (`job.reduce`).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from chameleon.config import ChameleonConfig, SubspaceConfig
from chameleon.core.records import UserRecord
from chameleon.core.synth import synthesize
from chameleon.job.reduce import reduce_users
from chameleon.job.tables import attach_user_reduce, pairs_to_tables, reduce_subspace_config, tables_to_units

log = logging.getLogger(__name__)


def candidate_layers(n_model_layers: int, cfg: SubspaceConfig) -> list[int]:
    """Layers captured and scored: the configured list, else 6 evenly spaced layers of the middle
    band (1/4 to 2/3 of the depth), where edits were seen to be harmless on the embedded model;
    explicit edit layers are always included."""
    if cfg.candidate_layers:
        layers = list(cfg.candidate_layers)
    else:
        lo, hi = n_model_layers // 4, max(n_model_layers // 4, (2 * n_model_layers) // 3)
        layers = sorted({int(round(x)) for x in np.linspace(lo, hi, num=min(6, hi - lo + 1))})
    layers = sorted(set(layers) | set(cfg.layers or []))
    bad = [x for x in layers if not 0 <= x < n_model_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {n_model_layers} layers")
    return layers


def process_partition(
    model, tok, users: Sequence[UserRecord], cfg: ChameleonConfig, layers: Sequence[int]
) -> tuple[pa.Table, pa.Table, list[dict]]:
    """Fake it for a partition; a user whose processing fails is isolated, not fatal.

    The partition is processed in one batch; if that fails, each user is retried alone so one
    bad user cannot take the others down. Returns (pairs, profiles, failures).
    """
    failures: list[dict] = []
    try:
        done = synthesize(model, tok, users, cfg, layers)
    except Exception:
        log.warning(
            "partition failed as a batch; retrying its %d users one by one", len(users), exc_info=True
        )
        done = []
        for u in users:
            try:
                done.extend(synthesize(model, tok, [u], cfg, layers))
            except Exception as exc:
                failures.append(
                    {
                        "user_id": u.user_id,
                        "reason": f"map stage failed: {type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=5),
                    }
                )
    pairs, profiles = pairs_to_tables(done)
    if pairs.num_rows:
        # Each user's own reduce runs here, where the pairs are made: the driver then reads these
        # per-user results instead of every pair vector (`job.reduce_stream`).
        data = tables_to_units(pairs, profiles, len(layers))
        profiles = attach_user_reduce(
            profiles, data, reduce_users(data, reduce_subspace_config(cfg), layers), cfg, layers
        )
    return pairs, profiles, failures
