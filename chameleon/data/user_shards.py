"""The user-shard codec: a run's users' own edits are written and read by these two functions only.

A shard (`users/shard-S.safetensors`, `data.layout.user_shards`: 1,024 users) stacks edits all
of one shape and form, with each user's CCS loss, whether they have an edit, and their kept pair
count; the manifest's `user_shards` lists the shards and the user index says which row is whose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chameleon.core.edit import Edit


def user_shard_tensors(
    edits: Sequence[Edit], *, ccs_loss: torch.Tensor, has_edit: torch.Tensor, n_pairs_kept: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One user shard: the users' own edits stacked (every user of a run has edits of one shape and
    form), with their CCS losses, whether each has an edit, and their kept pair counts."""
    forms = {e.form for e in edits}
    if len(forms) != 1:
        raise ValueError(f"a user shard holds edits of one form, got {sorted(forms)}")
    tensors = {
        "layers": torch.tensor([e.layers for e in edits], dtype=torch.int64),
        "theta_p": torch.stack([e.theta_p for e in edits]).contiguous(),
        "theta_n": torch.stack([e.theta_n for e in edits]).contiguous(),
        "mean": torch.stack([e.mean for e in edits]).contiguous(),
        "ccs_loss": ccs_loss.contiguous(),
        "has_edit": has_edit.to(torch.uint8),
        "n_pairs_kept": n_pairs_kept,
    }
    if edits[0].steer is not None:
        tensors["steer"] = torch.stack([e.steer for e in edits]).contiguous()  # type: ignore[misc]
        tensors["renorm"] = torch.tensor(int(edits[0].renorm), dtype=torch.uint8)
    return tensors


def user_shard_edit(tensors: dict[str, torch.Tensor], row: int, site: str) -> Edit:
    """The edit of the user in `row` of a shard written by `user_shard_tensors`."""
    return Edit(
        layers=tensors["layers"][row].tolist(),
        theta_p=tensors["theta_p"][row],
        theta_n=tensors["theta_n"][row],
        mean=tensors["mean"][row],
        site=site,
        steer=tensors["steer"][row] if "steer" in tensors else None,
        renorm=bool(int(tensors["renorm"])) if "renorm" in tensors else False,
    )
