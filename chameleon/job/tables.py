"""The job's tables at the boundary: a partition's synthetic data as Arrow tables, and back as
dense per-user tensors; each user's reduce results stored beside its profile row.

    pairs/part-K.parquet     user_id, group_id, pair_index, query, personalized, neutral,
                             insight_p, insight_n, emb_p, emb_n  (float32 [L*d] at the captured layers)
    profiles/part-K.parquet  user_id, group_id, selected (history indices), history_embedding [d],
                             heldout_query, heldout_text (held-out items for self-calibration),
                             style_features [F], marker_shares [len(MARKERS)], and `unit_*`
                             (each user's reduce, `attach_user_reduce`)

Everything past this module works on tensors (`UnitData`, `UserReduce`); nothing else converts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from chameleon.config import ChameleonConfig, SubspaceConfig
from chameleon.core import subspace as ss
from chameleon.core.synth import UserPairs
from chameleon.data.layout import column_matrix, vector_column


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
        if all(p.marker_shares is not None for p in pairs):
            shares = np.array([p.marker_shares for p in pairs], dtype=np.float32)
            profile_cols["marker_shares"] = vector_column(shares, shares.shape[1])
        if all(p.shared_diff is not None for p in pairs):  # per-user sums of the shared pairs
            diff = np.stack([p.shared_diff.reshape(-1).numpy() for p in pairs])
            norm = np.stack([p.shared_norm.numpy() for p in pairs])
            profile_cols["shared_diff"] = vector_column(diff, diff.shape[1])
            profile_cols["shared_norm"] = vector_column(norm, norm.shape[1])
            profile_cols["shared_count"] = pa.array([p.shared_count for p in pairs], pa.int32())
    return pairs_table, pa.table(profile_cols)


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


def reduce_subspace_config(cfg: ChameleonConfig) -> SubspaceConfig:
    """The subspace settings the reduce runs with."""
    if cfg.synth.pair_source in ("history", "style"):
        # Real text vs the model's own answer (or its neutral rendering): states of one prompt
        # are always close in cosine, so the insight source's near-duplicate filter does not
        # apply (identical answers are still dropped).
        return cfg.subspace.model_copy(update={"pair_cos_max": 1.0})
    return cfg.subspace


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
