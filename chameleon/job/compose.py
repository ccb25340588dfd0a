"""Shared and personal parts of an edit (`edit.composition: residual`).

A global edit (k = 1) carries what all users share: for LaMP-7 on a small model, "answer like
a person's tweet, not like an assistant" (the pooled shared pairs, `synth.shared_pairs`, when the
run has them; else every user's pooled style pairs). A group's and a user's own part is a
RESIDUAL: the unit of (own direction − global direction) at the global edit's layer, scaled by its
own calibrated strength (relative to the layer's typical state norm, as every additive edit). Every
part sits at that one layer, so a served edit is ONE row of one layer:

    group edit = global + group residual
    user edit  = global + group residual + user residual

The published group files and user shards keep the parts (`global_steer`, `group_steer`,
`user_steer`), so the evaluation can switch each off or swap it for another unit's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch

from chameleon.config import EditConfig
from chameleon.core.edit import Edit
from chameleon.data.layout import column_matrix

Reduced = Any
"""A `job.reduce.Reduced` (not imported: `job.reduce` dispatches to this module)."""


def residual_unit(own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """Unit vector of `own − shared` (both [d]); zero when they coincide (one group = the global)."""
    r = own - shared
    n = float(r.norm())
    return r / n if n > 1e-6 else torch.zeros_like(r)


def global_slot(reduced: Reduced) -> int:
    """Captured-layer slot of the global edit: its calibrated layer (the best one even when no
    strength beat the base model), else the middle captured layer."""
    cal = reduced.global_calibration
    if cal is not None and cal.best_layer in reduced.layers:
        return reduced.layers.index(cal.best_layer)
    return len(reduced.layers) // 2


def shared_steer(profiles: pa.Table, n_layers: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(unit direction [L, d], typical norm [L]) of every user's shared pairs pooled (the
    synthesis' per-user sums), or None for a run made without shared pairs."""
    if "shared_diff" not in profiles.column_names:
        return None
    count = float(sum(profiles.column("shared_count").to_pylist()))
    if not count:
        return None
    diff = torch.from_numpy(column_matrix(profiles, "shared_diff").sum(0)).float().reshape(n_layers, -1)
    norm = torch.from_numpy(column_matrix(profiles, "shared_norm").sum(0)).float() / count
    return diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12), norm


def served_global(reduced: Reduced) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit direction [L, d], typical norm [L]) the global part is served along: the shared
    pairs' when the run has them, else every user's pooled style pairs (`global_steer`, which is
    always what residuals are taken against: the same kind of pairs as the groups' and users')."""
    if reduced.shared_steer is not None:
        return reduced.shared_steer
    if reduced.global_steer is None:
        raise ValueError("edit.composition=residual needs the reduce's global direction")
    return reduced.global_steer


def global_part(reduced: Reduced, edit: EditConfig) -> tuple[int, torch.Tensor]:
    """(slot, steering vector [d]) of the global edit: calibrated strength, else `edit.strength`."""
    direction, norms = served_global(reduced)
    slot, cal = global_slot(reduced), reduced.global_calibration
    strength = cal.strength if cal is not None else edit.strength
    return slot, strength * float(norms[slot]) * direction[slot]


def group_residual_strength(reduced: Reduced, j: int, edit: EditConfig) -> float:
    cal = reduced.group_calibration[j] if reduced.group_calibration else None
    return cal.strength if cal is not None else edit.strength


def group_parts(reduced: Reduced, j: int, edit: EditConfig) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(slot, global vector, group residual vector) of group j, vectors [d]."""
    slot, shared = global_part(reduced, edit)
    direction, norms = reduced.group_steer
    unit = residual_unit(direction[j, slot], reduced.global_steer[0][slot])
    return slot, shared, group_residual_strength(reduced, j, edit) * float(norms[j, slot]) * unit


def user_parts(
    reduced: Reduced, i: int, edit: EditConfig
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot, global vector, group residual vector, user residual vector) of user i, vectors [d].
    The user's strength is its own calibrated one where it has one, else its group's."""
    g = int(reduced.grouping.labels[i])
    slot, shared, group = group_parts(reduced, g, edit)
    strength = reduced.user_strengths.get(reduced.data.user_ids[i], group_residual_strength(reduced, g, edit))
    direction, norms = reduced.user_steer
    unit = residual_unit(direction[i, slot], reduced.global_steer[0][slot])
    return slot, shared, group, strength * float(norms[i, slot]) * unit


def composed_edit(
    reduced: Reduced, sub, i: int, parts: Sequence[torch.Tensor], edit: EditConfig, site: str
) -> Edit:
    """One edit of one layer whose steering vector is the sum of `parts` (unit i of `sub` gives
    the projection fields, unused by the additive forms)."""
    slot = global_slot(reduced)
    return Edit(
        layers=[reduced.layers[slot]],
        theta_p=sub.theta_p[i, [slot]].clone(),
        theta_n=sub.theta_n[i, [slot]].clone(),
        mean=sub.mean[i, [slot]].clone(),
        site=site,
        steer=torch.stack(list(parts)).sum(0)[None],
        renorm=edit.form == "norm_preserving",
    )
