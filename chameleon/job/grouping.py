"""Grouping users, with the privacy floor: by a column of their records or by clustering, then
every group below `groups.min_contributors` distinct contributing users merged or dropped
(`enforce_min_contributors`), so no published group edit exposes a handful of users."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chameleon.config import ChameleonConfig, GroupConfig, SubspaceConfig
from chameleon.core import subspace as ss
from chameleon.job.tables import UnitData, UserReduce


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
