"""The parts of a composed edit as evaluation methods (`edit.composition: residual`).

A run published with the residual composition keeps the parts of every served row (global edit,
group residual, user residual; `job.compose`). From them the evaluation builds, per reported user:

- ``chameleon_global``: the global part alone (k = 1, the part every user shares);
- ``swapped_residual`` (control): the global part + ANOTHER reported user's personal part (group
  residual + user residual; from a user of another group when there is one), rescaled to the norm
  of the user's own personal part: same layer, same strength, same norm, someone else's direction;
- ``random_residual`` (control): the global part + a seeded random direction of the same norm.

A user's personal part is what `chameleon_user` adds to the global part (the group residual
alone for a user without an own edit). If the personal parts carry nothing user- or
group-specific, `chameleon_user` and `swapped_residual` score alike.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch

from chameleon.core.edit import Edit
from chameleon.data.published import PublishedRun

RESIDUAL_METHODS = ("swapped_residual", "random_residual")


def has_parts(run: PublishedRun) -> bool:
    return bool(run.group_ids) and bool(run.group_parts(run.group_ids[0]))


def _with_steer(edit: Edit, steer: torch.Tensor) -> Edit:
    return Edit(
        layers=list(edit.layers),
        theta_p=edit.theta_p,
        theta_n=edit.theta_n,
        mean=edit.mean,
        site=edit.site,
        steer=steer.reshape(1, -1).clone(),
        renorm=edit.renorm,
    )


def personal_parts(run: PublishedRun, user_ids: Sequence[str], group_ids: Sequence[str | None]):
    """Per user: (the group's composed edit, the global part [d], the personal part [d]), or None
    for a user without a group."""
    out = []
    for u, g in zip(user_ids, group_ids, strict=True):
        if g is None:
            out.append(None)
            continue
        parts = run.group_parts(g)
        own = run.user_part(u)
        personal = parts["group_steer"][0] + (own[0] if own is not None else 0)
        out.append((run.group_edit(g), parts["global_steer"][0], personal))
    return out


def partners(group_ids: Sequence[str | None], seed: str) -> list[int]:
    """For each user, another user (seeded), from another group when the users span several."""
    n = len(group_ids)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out = []
    for i in range(n):
        others = [j for j in order if j != i]
        other_group = [j for j in others if group_ids[j] != group_ids[i]]
        out.append((other_group or others or [i])[0])
    return out


def _unit_random(d: int, seed: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    r = torch.randn(d, generator=g)
    return r / r.norm()


def residual_edits(
    run: PublishedRun, user_ids: Sequence[str], group_ids: Sequence[str | None], seed: str
) -> dict[str, list[Edit | None]]:
    """Edits of `chameleon_global`, `swapped_residual` and `random_residual` for each user."""
    parts = personal_parts(run, user_ids, group_ids)
    mates = partners(group_ids, f"{seed}:swap")
    out: dict[str, list[Edit | None]] = {"chameleon_global": [], **{m: [] for m in RESIDUAL_METHODS}}
    for i, p in enumerate(parts):
        if p is None:
            for k in out:
                out[k].append(None)
            continue
        edit, shared, personal = p
        norm = personal.norm()
        mate = parts[mates[i]]
        other = mate[2] if mate is not None else torch.zeros_like(personal)
        swapped = other * (norm / other.norm()) if float(other.norm()) > 0 else torch.zeros_like(other)
        rand = _unit_random(personal.shape[-1], f"{seed}:random:{user_ids[i]}") * norm
        out["chameleon_global"].append(_with_steer(edit, shared))
        out["swapped_residual"].append(_with_steer(edit, shared + swapped))
        out["random_residual"].append(_with_steer(edit, shared + rand))
    return out
