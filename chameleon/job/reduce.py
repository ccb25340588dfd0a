"""The reduce: each user's subspace and layers, then each group's from its members' pooled pairs,
and the edits they make (`Reduced.group_edit` / `user_edit`).

`reduce_all` reduces the concatenated partition tables in memory; the streaming reduce
(`chameleon.job.reduce_stream`) reads each user's stored results instead and joins at
`group_and_reduce`, the second half every reduce shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
import torch

from chameleon.config import ChameleonConfig, EditConfig, SubspaceConfig
from chameleon.core import subspace as ss
from chameleon.core.calibration import Calibration
from chameleon.core.edit import Edit
from chameleon.core.marker_steering import MarkerParts
from chameleon.job import compose
from chameleon.job.grouping import Grouping, group_users
from chameleon.job.tables import UnitData, UserReduce, reduce_subspace_config, tables_to_units


def reduce_users(data: UnitData, cfg: SubspaceConfig, layers: Sequence[int], chunk: int = 2048) -> UserReduce:
    """θP, θN, CCS loss and layer choice for every user, `chunk` users per vectorized call."""
    mid = len(layers) // 2
    keep = ss.pair_filter_mask(data.H_P, data.H_N, data.mask, cfg.pair_cos_max, mid)
    parts = []
    for start in range(0, len(data.user_ids), chunk):
        sl = slice(start, start + chunk)
        parts.append(ss.fit_subspaces(data.H_P[sl], data.H_N[sl], keep[sl], cfg))
    if not parts:
        raise ValueError("no users to reduce")
    sub = ss.Subspaces.cat(parts)
    chosen = ss.choose_layers(sub, list(layers), cfg.n_layers, cfg.layers)
    steer = ss.steering_directions(data.H_P, data.H_N, keep)
    return UserReduce(sub, keep, chosen, keep.sum(1) >= cfg.min_pairs, steer)


def unit_edit(sub: ss.Subspaces, i: int, chosen: torch.Tensor, layers: Sequence[int], site: str) -> Edit:
    """The Edit of unit i of a reduce result, at its chosen layers."""
    idx = chosen[i]
    return Edit(
        layers=[layers[j] for j in idx.tolist()],
        theta_p=sub.theta_p[i, idx].clone(),
        theta_n=sub.theta_n[i, idx].clone(),
        mean=sub.mean[i, idx].clone(),
        site=site,
    )


Pool = Callable[[torch.Tensor, torch.Tensor, int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(member pairs [U, K], labels [U], n_groups, max_pairs, seed) -> pooled (H_P, H_N, mask), as
`core.subspace.pool_groups` returns them."""


def reduce_groups(
    data: UnitData,
    red: UserReduce,
    grouping: Grouping,
    cfg: SubspaceConfig,
    layers: Sequence[int],
    pool: Pool | None = None,
) -> tuple[ss.Subspaces, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Group subspaces from the pooled filtered pairs of each group's members.

    `pool` fetches the pooled pairs (default: from `data`'s dense pair tensors; the streaming
    reduce reads only the sampled rows back from the partitions).
    Returns (Subspaces over groups, chosen layers [G, n], the pooled (H_P, H_N, mask)).
    """
    pools = red.has_edit if grouping.pools is None else grouping.pools
    member_pairs = red.keep & pools[:, None]
    if pool is None:
        pool = partial(ss.pool_groups, data.H_P, data.H_N)
    pooled = pool(member_pairs, grouping.labels, len(grouping.group_ids), cfg.max_group_pairs, cfg.seed)
    sub = ss.fit_subspaces(*pooled, cfg)
    return sub, ss.choose_layers(sub, list(layers), cfg.n_layers, cfg.layers), pooled


@dataclass
class Reduced:
    """Everything the reduce computes from a run's pairs: per-user and per-group subspaces."""

    data: UnitData
    users: UserReduce
    grouping: Grouping
    groups: ss.Subspaces
    group_layers: torch.Tensor
    """[G, n] indices into the captured layers of each group's edit layers"""
    layers: list[int]
    """the captured layers"""
    group_steer: tuple[torch.Tensor, torch.Tensor]
    """(unit mean difference [G, L, d], typical state norm [G, L]) of each group's pooled pairs"""
    user_steer: tuple[torch.Tensor, torch.Tensor]
    """the same per user, [U, L, d] and [U, L]"""
    group_calibration: list[Calibration | None] = field(default_factory=list)
    """per group: the layer and strength chosen on its members' held-out texts (additive forms;
    with `edit.composition: residual`, the strength of the group's residual)"""
    global_steer: tuple[torch.Tensor, torch.Tensor] | None = None
    """`residual` composition: (unit mean difference [L, d], typical state norm [L]) of every
    user's pooled pairs: the shared part of every edit"""
    shared_steer: tuple[torch.Tensor, torch.Tensor] | None = None
    """`residual` composition with shared pairs: (unit direction [L, d], typical norm [L]) of
    every user's shared pairs pooled: the served global part (else `global_steer` is)"""
    global_calibration: Calibration | None = None
    """`residual` composition: the global edit's layer and strength"""
    user_strengths: dict[str, float] = field(default_factory=dict)
    """`residual` composition: users' own residual strengths, calibrated on their own held-out
    items (users not in it take their group's residual strength)"""
    marker_parts: MarkerParts | None = None
    """`edit.markers`: the marker directions the calibration step derived (None: no marker parts)"""

    def group_edit(self, j: int, edit: EditConfig, site: str) -> Edit:
        if edit.composition == "residual":
            return compose.composed_edit(
                self, self.groups, j, compose.group_parts(self, j, edit)[1:], edit, site
            )
        cal = self.group_calibration[j] if self.group_calibration else None
        return self._edit(self.groups, j, self.group_layers, self.group_steer, cal, edit, site)

    def user_edit(self, i: int, edit: EditConfig, site: str) -> Edit:
        """A user's own edit: its own direction, at its group's calibrated layer and strength
        (`residual`: global + group residual + the user's residual)."""
        if edit.composition == "residual":
            return compose.composed_edit(
                self, self.users.sub, i, compose.user_parts(self, i, edit)[1:], edit, site
            )
        g = int(self.grouping.labels[i])
        cal = self.group_calibration[g] if self.group_calibration else None
        return self._edit(self.users.sub, i, self.users.chosen, self.user_steer, cal, edit, site)

    def _edit(self, sub, i, chosen, steer, cal: Calibration | None, edit: EditConfig, site: str) -> Edit:
        if edit.form == "projection":
            return unit_edit(sub, i, chosen, self.layers, site)
        direction, norms = steer
        if cal is not None:  # one layer; strength 0 = the base model
            strength = cal.strength
            slots = (
                [self.layers.index(cal.best_layer)]
                if cal.best_layer in self.layers
                else chosen[i].tolist()[:1]
            )
        else:
            slots, strength = chosen[i].tolist(), edit.strength
        vectors = torch.stack([strength * float(norms[i, s]) * direction[i, s] for s in slots])
        return Edit(
            layers=[self.layers[s] for s in slots],
            theta_p=sub.theta_p[i, slots].clone(),
            theta_n=sub.theta_n[i, slots].clone(),
            mean=sub.mean[i, slots].clone(),
            site=site,
            steer=vectors,
            renorm=edit.form == "norm_preserving",
        )


def reduce_all(
    pairs: pa.Table,
    profiles: pa.Table,
    cfg: ChameleonConfig,
    layers: Sequence[int],
    timings: dict[str, float] | None = None,
) -> Reduced:
    """Users' subspaces, groups, and the groups' subspaces, from a run's concatenated partitions."""
    t0 = time.perf_counter()
    sub_cfg = reduce_subspace_config(cfg)
    data = tables_to_units(pairs, profiles, len(layers))
    users = reduce_users(data, sub_cfg, layers)
    return group_and_reduce(data, users, cfg, layers, timings, t0)


def group_and_reduce(
    data: UnitData,
    users: UserReduce,
    cfg: ChameleonConfig,
    layers: Sequence[int],
    timings: dict[str, float] | None,
    t0: float,
    pool: Pool | None = None,
) -> Reduced:
    """The second half of every reduce: group the reduced users, fit the groups (pooling pairs
    with `pool`, default: from `data`'s own pair vectors), and bundle it all. `t0`: when the
    per-user half began (for `timings`)."""
    t1 = time.perf_counter()
    grouping = group_users(data, users, cfg)
    groups, group_layers, pooled = reduce_groups(
        data, users, grouping, reduce_subspace_config(cfg), layers, pool
    )
    if timings is not None:
        timings["reduce_users_s"] = t1 - t0
        timings["reduce_groups_s"] = time.perf_counter() - t1
    global_steer = None
    if cfg.edit.composition == "residual":  # every user's kept pairs, pooled as one group
        sub_cfg = reduce_subspace_config(cfg)
        pools = users.has_edit if grouping.pools is None else grouping.pools
        every = torch.zeros(len(data.user_ids), dtype=torch.long)
        fetch = pool or partial(ss.pool_groups, data.H_P, data.H_N)
        H_P, H_N, mask = fetch(users.keep & pools[:, None], every, 1, sub_cfg.max_group_pairs, sub_cfg.seed)
        direction, norms = ss.steering_directions(H_P, H_N, mask)
        global_steer = (direction[0], norms[0])
    return Reduced(
        data,
        users,
        grouping,
        groups,
        group_layers,
        list(layers),
        group_steer=ss.steering_directions(*pooled),
        user_steer=users.steer,
        global_steer=global_steer,
    )
