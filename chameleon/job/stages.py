"""The job's stages as plain functions: map a partition, reduce users, group, reduce groups.

Both drivers call exactly these: the in-process one (`chameleon.job.local`) and the Ray job
(`chameleon.job.ray_job`, which runs `process_partition` inside actors). Nothing here imports Ray.

Tables between stages (one Parquet file per partition):

    pairs/part-K.parquet     user_id, group_id, pair_index, query, personalized, neutral,
                             insight_p, insight_n, emb_p, emb_n  (float32 [L*d] at the captured layers)
    profiles/part-K.parquet  user_id, group_id, selected (history indices), history_embedding [d],
                             heldout_query, heldout_text (held-out items for self-calibration)
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import torch

from chameleon.config import ChameleonConfig, EditConfig, GroupConfig, SubspaceConfig
from chameleon.core import subspace as ss
from chameleon.core.calibration import Calibration
from chameleon.core.edit import Edit
from chameleon.core.records import UserRecord
from chameleon.core.synth import UserPairs, synthesize
from chameleon.data.layout import column_matrix, vector_column
from chameleon.job import compose

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


# ---------------------------------------------------------------------------------------------
# Map


def pairs_to_tables(pairs: Sequence[UserPairs]) -> tuple[pa.Table, pa.Table]:
    """Arrow tables (pairs, profiles) of a partition's synthetic data."""
    rows: dict[str, list] = {
        k: []
        for k in (
            "user_id",
            "group_id",
            "pair_index",
            "query",
            "personalized",
            "neutral",
            "insight_p",
            "insight_n",
        )
    }
    emb_p, emb_n = [], []
    for up in pairs:
        for i, q in enumerate(up.queries):
            rows["user_id"].append(up.user_id)
            rows["group_id"].append(up.group_id)
            rows["pair_index"].append(i)
            rows["query"].append(q)
            rows["personalized"].append(up.personalized[i])
            rows["neutral"].append(up.neutral[i])
            rows["insight_p"].append(up.insight_p)
            rows["insight_n"].append(up.insight_n)
        emb_p.append(up.emb_p.reshape(len(up.queries), -1).numpy())
        emb_n.append(up.emb_n.reshape(len(up.queries), -1).numpy())
    width = emb_p[0].shape[1] if emb_p else 0
    cols = {k: pa.array(v, type=pa.int32() if k == "pair_index" else pa.string()) for k, v in rows.items()}
    if emb_p:
        cols["emb_p"] = vector_column(np.concatenate(emb_p), width)
        cols["emb_n"] = vector_column(np.concatenate(emb_n), width)
    pairs_table = pa.table(cols)
    profile_cols = {
        "user_id": pa.array([p.user_id for p in pairs], pa.string()),
        "group_id": pa.array([p.group_id for p in pairs], pa.string()),
        "selected": pa.array([p.selected for p in pairs], pa.list_(pa.int32())),
        "heldout_query": pa.array([p.heldout_queries for p in pairs], pa.list_(pa.string())),
        "heldout_text": pa.array([p.heldout_texts for p in pairs], pa.list_(pa.string())),
    }
    # A partition whose users all failed has no vectors (and no width): readers skip empty parts.
    if pairs:
        d = pairs[0].history_embedding.shape[0]
        profile_cols["history_embedding"] = vector_column(
            np.stack([p.history_embedding.numpy() for p in pairs]), d
        )
        if all(p.style_features is not None for p in pairs):
            styles = np.stack([p.style_features.numpy() for p in pairs])
            profile_cols["style_features"] = vector_column(styles, styles.shape[1])
        if all(p.shared_diff is not None for p in pairs):  # per-user sums of the shared pairs
            diff = np.stack([p.shared_diff.reshape(-1).numpy() for p in pairs])
            norm = np.stack([p.shared_norm.numpy() for p in pairs])
            profile_cols["shared_diff"] = vector_column(diff, diff.shape[1])
            profile_cols["shared_norm"] = vector_column(norm, norm.shape[1])
            profile_cols["shared_count"] = pa.array([p.shared_count for p in pairs], pa.int32())
    return pairs_table, pa.table(profile_cols)


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


# ---------------------------------------------------------------------------------------------
# Reduce


@dataclass
class UnitData:
    """All users' pairs as dense tensors, in user order."""

    user_ids: list[str]
    group_ids: list[str | None]
    H_P: torch.Tensor | None
    """[U, K, L, d]; None after a partition-by-partition reduce (`job.reduce_stream`), which keeps
    no pair vectors once each user is reduced"""
    H_N: torch.Tensor | None
    mask: torch.Tensor
    """[U, K] real pair slots"""
    history_embedding: torch.Tensor
    """[U, d]"""
    style_features: torch.Tensor | None = None
    """[U, F] stylometric features of each user's history (None in runs made without them)"""


def tables_to_units(pairs: pa.Table, profiles: pa.Table, n_layers: int) -> UnitData:
    """Dense per-user tensors from the concatenated partition tables (users sorted by id)."""
    prof_ids = profiles.column("user_id").to_pylist()
    order = sorted(range(len(prof_ids)), key=lambda i: prof_ids[i])
    user_ids = [prof_ids[i] for i in order]
    index = {u: j for j, u in enumerate(user_ids)}
    groups_all = profiles.column("group_id").to_pylist()
    group_ids = [groups_all[i] for i in order]
    hist = column_matrix(profiles, "history_embedding")
    history = torch.from_numpy(hist[order].copy()) if len(order) else torch.zeros(0, 0)
    U = len(user_ids)
    width = pairs.schema.field("emb_p").type.list_size if "emb_p" in pairs.column_names else 0
    d = width // n_layers if n_layers else 0
    uid = pairs.column("user_id").to_pylist()
    pidx = pairs.column("pair_index").to_pylist()
    K = max(pidx) + 1 if pidx else 1
    H_P = torch.zeros(U, K, n_layers, d)
    H_N = torch.zeros(U, K, n_layers, d)
    mask = torch.zeros(U, K, dtype=torch.bool)
    if len(uid):
        ep = torch.from_numpy(column_matrix(pairs, "emb_p").reshape(len(uid), n_layers, d).copy())
        en = torch.from_numpy(column_matrix(pairs, "emb_n").reshape(len(uid), n_layers, d).copy())
        rows = torch.tensor([index[u] for u in uid])
        cols = torch.tensor(pidx)
        H_P[rows, cols] = ep
        H_N[rows, cols] = en
        mask[rows, cols] = True
    style = None
    if "style_features" in profiles.column_names:
        style = torch.from_numpy(column_matrix(profiles, "style_features")[order].copy()).float()
    return UnitData(user_ids, group_ids, H_P, H_N, mask, history, style)


@dataclass
class UserReduce:
    """Per-user results of the reduce stage."""

    sub: ss.Subspaces
    keep: torch.Tensor
    """[U, K] pairs that passed the filter"""
    chosen: torch.Tensor
    """[U, n] indices into the captured layers of each user's edit layers"""
    has_edit: torch.Tensor
    """[U] users with enough pairs for an edit of their own"""
    steer: tuple[torch.Tensor, torch.Tensor]
    """(unit mean difference personalized − neutral [U, L, d], typical state norm [U, L]) of each
    user's kept pairs: the additive forms' user direction, and the `contrast` grouping feature"""


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


# -- per-user results stored with a partition's profiles -------------------------------------------

UNIT_PREFIX = "unit_"
UNIT_SIGNATURE = b"chameleon.unit_signature"
"""Schema metadata of a profiles table with per-user results: what they were computed under."""


def unit_signature(cfg: ChameleonConfig, layers: Sequence[int]) -> bytes:
    """The settings per-user results depend on; results made under others are recomputed."""
    return json.dumps(
        {"subspace": reduce_subspace_config(cfg).model_dump(), "layers": list(layers)}, sort_keys=True
    ).encode()


def attach_user_reduce(
    profiles: pa.Table, data: UnitData, red: UserReduce, cfg: ChameleonConfig, layers: Sequence[int]
) -> pa.Table:
    """`profiles` with each user's reduce (`reduce_users` on `data`) as `unit_*` columns."""
    row = {u: i for i, u in enumerate(data.user_ids)}
    order = torch.tensor([row[u] for u in profiles.column("user_id").to_pylist()], dtype=torch.long)
    sub = red.sub.select(order)

    def vec(x: torch.Tensor) -> pa.Array:
        flat = x.reshape(len(order), -1).float()
        return vector_column(flat.numpy(), flat.shape[1])

    def bools(x: torch.Tensor) -> pa.Array:
        return pa.array(x[order].tolist(), pa.list_(pa.bool_()))

    cols = {
        "mask": bools(data.mask),
        "keep": bools(red.keep),
        "theta_p": vec(sub.theta_p),
        "rank": pa.array(sub.rank.tolist(), pa.list_(pa.int32())),
        "theta_n": vec(sub.theta_n),
        "ccs_loss": vec(sub.ccs_loss),
        "mean": vec(sub.mean),
        "chosen": pa.array(red.chosen[order].tolist(), pa.list_(pa.int32())),
        "steer": vec(red.steer[0][order]),
        "steer_norm": vec(red.steer[1][order]),
    }
    for name, col in cols.items():
        profiles = profiles.append_column(UNIT_PREFIX + name, col)
    meta = {**(profiles.schema.metadata or {}), UNIT_SIGNATURE: unit_signature(cfg, layers)}
    return profiles.replace_schema_metadata(meta)


def stored_user_reduce(
    profiles: pa.Table, cfg: ChameleonConfig, layers: Sequence[int]
) -> tuple[UnitData, UserReduce] | None:
    """The per-user results stored with `profiles` (users sorted by id, no pair vectors), or None
    when there are none or they were computed under other settings."""
    meta = profiles.schema.metadata or {}
    if UNIT_PREFIX + "theta_n" not in profiles.column_names or not profiles.num_rows:
        return None
    if meta.get(UNIT_SIGNATURE) != unit_signature(cfg, layers):
        return None
    ids = profiles.column("user_id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    U, L = len(ids), len(layers)

    def col(name: str, *shape: int) -> torch.Tensor:
        return torch.from_numpy(column_matrix(profiles, UNIT_PREFIX + name)[order].copy()).reshape(U, *shape)

    def ragged(name: str, dtype: torch.dtype) -> torch.Tensor:
        rows = profiles.column(UNIT_PREFIX + name).to_pylist()
        K = max(len(r) for r in rows)
        return torch.tensor([rows[i] + [False] * (K - len(rows[i])) for i in order], dtype=dtype)

    mask, keep = ragged("mask", torch.bool), ragged("keep", torch.bool)
    d = column_matrix(profiles, UNIT_PREFIX + "theta_n").shape[1] // L
    theta_p = col("theta_p", L, -1, d)
    groups = profiles.column("group_id").to_pylist()
    hist = torch.from_numpy(column_matrix(profiles, "history_embedding")[order].copy())
    style = None
    if "style_features" in profiles.column_names:
        style = torch.from_numpy(column_matrix(profiles, "style_features")[order].copy()).float()
    data = UnitData([ids[i] for i in order], [groups[i] for i in order], None, None, mask, hist, style)
    ranks, chosen_rows = (profiles.column(UNIT_PREFIX + n).to_pylist() for n in ("rank", "chosen"))
    rank = torch.tensor([ranks[i] for i in order], dtype=torch.long)
    sub = ss.Subspaces(
        theta_p, rank, col("theta_n", L, d), col("ccs_loss", L), col("mean", L, d), keep.sum(1)
    )
    chosen = torch.tensor([chosen_rows[i] for i in order], dtype=torch.long)
    min_pairs = reduce_subspace_config(cfg).min_pairs
    red = UserReduce(sub, keep, chosen, keep.sum(1) >= min_pairs, (col("steer", L, d), col("steer_norm", L)))
    return data, red


def without_user_reduce(profiles: pa.Table) -> pa.Table:
    """`profiles` without the per-user result columns (what calibration and evaluation read)."""
    kept = profiles.select([c for c in profiles.column_names if not c.startswith(UNIT_PREFIX)])
    meta = {k: v for k, v in (kept.schema.metadata or {}).items() if k != UNIT_SIGNATURE}
    return kept.replace_schema_metadata(meta or None)


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


# ---------------------------------------------------------------------------------------------
# Groups


@dataclass
class Grouping:
    group_ids: list[str]
    labels: torch.Tensor
    """[U] index into group_ids"""
    distance: torch.Tensor
    """[U] 1 - cosine to the group's centroid in the space the user was assigned in"""
    assigned_by: list[str]
    """per user: `cluster`, `column` or `history`"""
    history_centroids: torch.Tensor
    """[G, d] mean history embedding of each group's members (assigns unseen users)"""
    sizes: list[int] = field(default_factory=list)
    """members per group (everyone assigned to it)"""
    pools: torch.Tensor | None = None
    """[U] users whose pairs may enter their group's edit (default: users with an edit of their own)"""
    contributors: list[int] = field(default_factory=list)
    """per group: distinct users whose pairs entered its pooled subspace"""
    unpublished: list[dict] = field(default_factory=list)
    """groups below `groups.min_contributors`: what became of each (merged into / dropped)"""


def _grouping_features(data: UnitData, red: UserReduce, features: str, idx: torch.Tensor) -> torch.Tensor:
    """[n, F] unit rows that the clustering compares by cosine, for the users `idx`."""
    if features == "style":
        if data.style_features is None:
            raise ValueError("groups.features=style needs a run whose map stage recorded style features")
        x = data.style_features[idx]
        z = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # every feature counts alike
        return torch.nn.functional.normalize(z, dim=-1)
    if features == "contrast":
        direction = red.steer[0][idx]
        return torch.nn.functional.normalize(direction.reshape(len(idx), -1), dim=-1)
    return ss.grouping_features(red.sub.select(idx))


def group_users(data: UnitData, red: UserReduce, cfg: ChameleonConfig) -> Grouping:
    """Group by the configured column, else cluster users on `groups.features`.

    Style features cluster every user; subspace and contrast features only users with a usable
    edit. Users left out (too few pairs, or missing the column) are placed by their history
    embedding, exactly as an unseen user would be.
    """
    g = cfg.groups
    U = len(data.user_ids)
    labels = torch.full((U,), -1, dtype=torch.long)
    distance = torch.zeros(U)
    assigned = ["history"] * U
    if g.group_column:
        names = sorted({x for x in data.group_ids if x is not None})
        if not names:
            raise ValueError(f"groups.group_column={g.group_column!r} but no accepted user has that field")
        for i, name in enumerate(data.group_ids):
            if name is not None:
                labels[i] = names.index(name)
                assigned[i] = "column"
        group_ids = names
    else:
        # Style is known for every user; subspaces and contrasts only for users with enough pairs.
        clusterable = torch.ones_like(red.has_edit) if g.features == "style" else red.has_edit
        idx = torch.nonzero(clusterable).flatten()
        if len(idx) == 0:
            raise ValueError("no user has enough pairs for a subspace; nothing to group")
        feats = _grouping_features(data, red, g.features, idx)
        lab, _, dist = ss.cluster_users(feats, g.n_groups, g.min_group_size, g.seed)
        labels[idx] = lab
        distance[idx] = dist
        for i in idx.tolist():
            assigned[i] = "cluster"
        group_ids = [f"g{j:03d}" for j in range(int(lab.max()) + 1)]
    G = len(group_ids)
    placed = labels >= 0
    cent = torch.stack([data.history_embedding[labels == j].mean(0) for j in range(G)])
    if (~placed).any():
        gi, gd = ss.nearest_group(data.history_embedding[~placed], cent)
        labels[~placed] = gi
        distance[~placed] = gd
    sizes = torch.bincount(labels, minlength=G).tolist()
    grouping = Grouping(group_ids, labels, distance, assigned, cent, sizes)
    return enforce_min_contributors(data, red, grouping, g, cfg.subspace)


def _contributors(red: UserReduce, labels: torch.Tensor, pools: torch.Tensor, G: int, sub: SubspaceConfig):
    """Distinct users among the pairs each group pools (the very sample `reduce_groups` takes)."""
    K = red.keep.shape[1]
    rows = ss.group_pair_rows(red.keep & pools[:, None], labels, G, sub.max_group_pairs, sub.seed)
    return [len(torch.unique(r // K)) for r in rows]


def enforce_min_contributors(
    data: UnitData, red: UserReduce, grouping: Grouping, g: GroupConfig, sub: SubspaceConfig
) -> Grouping:
    """Every published group edit pools the pairs of at least `g.min_contributors` users.

    The group with the fewest contributors below the floor goes first: merged into the group with
    the nearest history centroid, or dropped (members placed by history, their pairs unused), as
    `g.small_groups` says; repeated until every group left meets the floor. Raises ValueError when
    even one group over all users cannot.
    """
    names = list(grouping.group_ids)
    labels, distance = grouping.labels.clone(), grouping.distance.clone()
    assigned = list(grouping.assigned_by)
    pools = red.has_edit.clone()
    merged = torch.zeros_like(pools)
    hist = data.history_embedding
    unpublished: list[dict] = []
    while True:
        contrib = _contributors(red, labels, pools, len(names), sub)
        small = [j for j in range(len(names)) if contrib[j] < g.min_contributors]
        if not small:
            break
        if len(names) == 1:
            if contrib[0] == 0:
                break  # nobody's pairs enter the edit (it stays empty): nothing to expose
            raise ValueError(
                f"only {contrib[0]} users contributed pairs to the group edits, fewer than "
                f"groups.min_contributors={g.min_contributors}: nothing can be published without "
                "exposing a handful of users; add users or lower groups.min_contributors"
            )
        j = min(small, key=lambda i: (contrib[i], names[i]))
        others = [i for i in range(len(names)) if i != j]
        cent = torch.stack([hist[labels == i].mean(0) for i in range(len(names))])
        members = labels == j
        row = {"group_id": names[j], "contributors": contrib[j], "members": int(members.sum())}
        if g.small_groups == "merge":
            near, _ = ss.nearest_group(cent[j : j + 1], cent[others])
            target = others[int(near[0])]
            labels[members] = target
            merged |= members
            row.update(action="merged", into=names[target])
        else:
            pools &= ~members
            near, dist = ss.nearest_group(hist[members], cent[others])
            labels[members] = torch.tensor(others)[near]
            distance[members] = dist
            for i in torch.nonzero(members).flatten().tolist():
                assigned[i] = "history"
            row.update(action="dropped")
        unpublished.append(row)
        names.pop(j)
        labels[labels > j] -= 1
    G = len(names)
    cent = torch.stack([hist[labels == i].mean(0) for i in range(G)])
    if merged.any():  # a merged member's distance is to its new group's history centroid
        distance[merged] = 1 - torch.nn.functional.cosine_similarity(
            hist[merged], cent[labels[merged]], dim=-1
        )
    return Grouping(
        names,
        labels,
        distance,
        assigned,
        cent,
        torch.bincount(labels, minlength=G).tolist(),
        pools,
        contrib,
        unpublished,
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


def reduce_subspace_config(cfg: ChameleonConfig) -> SubspaceConfig:
    """The subspace settings the reduce runs with."""
    if cfg.synth.pair_source in ("history", "style"):
        # Real text vs the model's own answer (or its neutral rendering): states of one prompt
        # are always close in cosine, so the insight source's near-duplicate filter does not
        # apply (identical answers are still dropped).
        return cfg.subspace.model_copy(update={"pair_cos_max": 1.0})
    return cfg.subspace


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
