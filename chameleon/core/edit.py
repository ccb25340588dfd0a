"""Hidden-state edits, many per batch.

An `Edit` is one unit's change of the hidden states at a few layers (a user's or a group's), in
one of three forms:

    projection       x ← x + α Σ_r ⟨x − μ, θP_r⟩ θP_r      (add the personalized component)
                     x ← x − β ⟨x − μ, θN⟩ θN               (remove the non-personalized component)
    additive         x ← x + α s                            (s: a steering vector, `Edit.steer`)
    norm_preserving  x ← (x + α s) ‖x‖ / ‖x + α s‖          (the same direction, ‖x‖ kept)

with μ = 0 when projection edits are not centered. A projection edit scales with the state's own
component along θ (it can be tiny in a small model); an additive edit moves every state by the
same vector, whose length the job sets relative to the layer's typical state norm.

An `EditBank` holds many edits as rows of stacked tensors on the model's device; row 0 is the
identity. Inside one batched forward, every row of the batch picks its own bank row, and each
edited layer applies all of them in one batched operation. The edit is applied through forward
hooks, so it works with `generate()` and the KV cache (at decode time each call carries only the
new token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from chameleon.core.model import layer_module


@dataclass
class Edit:
    """Directions of one user or group at `layers` (θ unit-norm; zero rows past the rank)."""

    layers: list[int]
    theta_p: torch.Tensor
    """[n_layers, r, d]"""
    theta_n: torch.Tensor
    """[n_layers, d]"""
    mean: torch.Tensor
    """[n_layers, d] μ of the centered edit."""
    site: str = "mlp"
    steer: torch.Tensor | None = None
    """[n_layers, d] steering vector added at each layer (additive forms); None = projection form."""
    renorm: bool = False
    """With `steer`: keep each state's norm (the norm-preserving form)."""

    @classmethod
    def additive(
        cls, layers: Sequence[int], steer: torch.Tensor, *, site: str, renorm: bool = False, rank: int = 1
    ) -> Edit:
        """An additive edit adding `steer[i]` ([len(layers), d]) at `layers[i]` (the projection
        fields, unused by the additive forms, are zeros of rank `rank`)."""
        n, d = steer.shape
        return cls(
            layers=list(layers),
            theta_p=torch.zeros(n, rank, d),
            theta_n=torch.zeros(n, d),
            mean=torch.zeros(n, d),
            site=site,
            steer=steer.float(),
            renorm=renorm,
        )

    @property
    def form(self) -> str:
        if self.steer is None:
            return "projection"
        return "norm_preserving" if self.renorm else "additive"

    def __post_init__(self) -> None:
        n, d = len(self.layers), self.theta_n.shape[-1]
        if self.theta_p.ndim != 3 or self.theta_p.shape[0] != n or self.theta_p.shape[2] != d:
            raise ValueError(f"theta_p must be [{n}, r, {d}], got {list(self.theta_p.shape)}")
        if list(self.theta_n.shape) != [n, d] or list(self.mean.shape) != [n, d]:
            raise ValueError("theta_n and mean must be [n_layers, d]")
        if self.steer is not None and list(self.steer.shape) != [n, d]:
            raise ValueError(f"steer must be [{n}, {d}], got {list(self.steer.shape)}")
        if len(set(self.layers)) != n:
            raise ValueError(f"duplicate layers in {self.layers}")
        for name in ("theta_p", "theta_n", "mean", "steer"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"edit has non-finite values in {name}")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "layers": torch.tensor(self.layers, dtype=torch.int64),
            "theta_p": self.theta_p.float().contiguous(),
            "theta_n": self.theta_n.float().contiguous(),
            "mean": self.mean.float().contiguous(),
        }
        if self.steer is not None:
            out["steer"] = self.steer.float().contiguous()
            out["renorm"] = torch.tensor(int(self.renorm), dtype=torch.uint8)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], site: str = "mlp") -> Edit:
        return cls(
            layers=[int(x) for x in tensors["layers"].tolist()],
            theta_p=tensors["theta_p"],
            theta_n=tensors["theta_n"],
            mean=tensors["mean"],
            site=site,
            steer=tensors.get("steer"),
            renorm=bool(int(tensors["renorm"])) if "renorm" in tensors else False,
        )


def edit_rows(
    x: torch.Tensor,
    P: torch.Tensor,
    N: torch.Tensor,
    mu: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    steer: torch.Tensor | None = None,
    renorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply per-row edits to x [B, T, d] with P [B, r, d], N [B, d], mu [B, d], alpha/beta [B],
    steer [B, d] and renorm [B] (bool). A row uses the projection part, the steering part or both
    (zero tensors make a part a no-op).

    The math runs in float32 and the result is cast back; rows with zero directions come back
    with x unchanged up to that cast (callers mask identity rows to make them bit-exact).
    """
    xf = x.float()
    c = xf - mu[:, None, :]
    coef = torch.einsum("btd,brd->btr", c, P)
    xf = xf + alpha[:, None, None] * torch.einsum("btr,brd->btd", coef, P)
    c = xf - mu[:, None, :]
    proj = torch.einsum("btd,bd->bt", c, N)
    xf = xf - beta[:, None, None] * proj[..., None] * N[:, None, :]
    if steer is not None:
        norm = xf.norm(dim=-1, keepdim=True)
        xf = xf + alpha[:, None, None] * steer[:, None, :]
        if renorm is not None:
            kept = xf * (norm / xf.norm(dim=-1, keepdim=True).clamp_min(1e-6))
            xf = torch.where(renorm[:, None, None], kept, xf)
    return xf.to(x.dtype)


class EditBank:
    """Rows of edits for one model and site; row 0 is the identity (no edit)."""

    def __init__(
        self,
        hidden_size: int,
        layers: Sequence[int],
        site: str = "mlp",
        max_rank: int = 3,
        positions: str = "last",
        device: torch.device | str = "cpu",
    ) -> None:
        if positions not in ("last", "all"):
            raise ValueError("positions must be 'last' or 'all'")
        self.hidden_size = hidden_size
        self.layers = sorted(set(int(x) for x in layers))
        self.site = site
        self.max_rank = max_rank
        self.positions = positions
        self.device = torch.device(device)
        n, d = len(self.layers), hidden_size
        # Per bank layer, per row: the row's directions at that layer (zero = no edit there).
        self.P = torch.zeros(1, n, max_rank, d, device=self.device)
        self.N = torch.zeros(1, n, d, device=self.device)
        self.mu = torch.zeros(1, n, d, device=self.device)
        self.S = torch.zeros(1, n, d, device=self.device)
        self.renorm = torch.zeros(1, dtype=torch.bool, device=self.device)
        self.alpha = torch.zeros(1, device=self.device)
        self.beta = torch.zeros(1, device=self.device)
        self.active = torch.zeros(1, n, dtype=torch.bool, device=self.device)

    @property
    def n_rows(self) -> int:
        return self.P.shape[0]

    def _layer_slot(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"layer {layer} is not one of this bank's layers {self.layers}") from None

    def _row_tensors(self, edit: Edit, centered: bool):
        if edit.site != self.site:
            raise ValueError(f"edit is for site {edit.site!r}, bank for {self.site!r}")
        if edit.theta_n.shape[-1] != self.hidden_size:
            raise ValueError(
                f"edit hidden size {edit.theta_n.shape[-1]} != model hidden size {self.hidden_size}"
            )
        if edit.theta_p.shape[1] > self.max_rank:
            raise ValueError(f"edit rank {edit.theta_p.shape[1]} > bank max_rank {self.max_rank}")
        n, d, r = len(self.layers), self.hidden_size, edit.theta_p.shape[1]
        P = torch.zeros(n, self.max_rank, d)
        N = torch.zeros(n, d)
        mu = torch.zeros(n, d)
        S = torch.zeros(n, d)
        active = torch.zeros(n, dtype=torch.bool)
        for i, layer in enumerate(edit.layers):
            s = self._layer_slot(layer)
            if edit.steer is not None:  # additive forms: the steering vector alone
                S[s] = edit.steer[i].float().cpu()
            else:
                P[s, :r] = edit.theta_p[i].float().cpu()
                N[s] = edit.theta_n[i].float().cpu()
                if centered:
                    mu[s] = edit.mean[i].float().cpu()
            active[s] = True
        return P, N, mu, S, active

    def add(self, edit: Edit, alpha: float = 1.0, beta: float = 1.0, centered: bool = True) -> int:
        """Append an edit as a new row; return its row index."""
        return self.add_many([edit], alpha, beta, centered)[0]

    def add_many(
        self, edits: Sequence[Edit], alpha: float = 1.0, beta: float = 1.0, centered: bool = True
    ) -> list[int]:
        if not edits:
            return []
        rows = [self._row_tensors(e, centered) for e in edits]
        start = self.n_rows
        dev = self.device
        self.P = torch.cat([self.P, torch.stack([r[0] for r in rows]).to(dev)])
        self.N = torch.cat([self.N, torch.stack([r[1] for r in rows]).to(dev)])
        self.mu = torch.cat([self.mu, torch.stack([r[2] for r in rows]).to(dev)])
        self.S = torch.cat([self.S, torch.stack([r[3] for r in rows]).to(dev)])
        self.active = torch.cat([self.active, torch.stack([r[4] for r in rows]).to(dev)])
        self.renorm = torch.cat([self.renorm, torch.tensor([e.renorm for e in edits], device=dev)])
        self.alpha = torch.cat([self.alpha, torch.full((len(edits),), float(alpha), device=dev)])
        self.beta = torch.cat([self.beta, torch.full((len(edits),), float(beta), device=dev)])
        return list(range(start, start + len(edits)))

    def set_row(
        self, row: int, edit: Edit, alpha: float = 1.0, beta: float = 1.0, centered: bool = True
    ) -> None:
        """Overwrite a row in place (a cache slot being reused); row 0 stays the identity."""
        if not 1 <= row < self.n_rows:
            raise IndexError(f"row {row} is not an editable row (1..{self.n_rows - 1})")
        P, N, mu, S, active = self._row_tensors(edit, centered)
        self.P[row], self.N[row], self.mu[row], self.S[row], self.active[row] = (
            t.to(self.device) for t in (P, N, mu, S, active)
        )
        self.renorm[row] = edit.renorm
        self.alpha[row], self.beta[row] = float(alpha), float(beta)

    # -----------------------------------------------------------------------------------------

    def bind(self, rows: torch.Tensor | Sequence[int]) -> BoundEdits:
        """The edits of one batch composition (batch row i uses bank row rows[i]), gathered once.

        Reuse the result while the composition holds (e.g. across decode steps): gathering is done
        once instead of in every layer call, and layers no row edits get no hook at all.
        """
        return BoundEdits(self, rows)

    @contextlib.contextmanager
    def apply(self, model: nn.Module, rows: torch.Tensor | Sequence[int]) -> Iterator[None]:
        """Edit `model` while inside the block; batch row i uses bank row rows[i]."""
        with self.bind(rows).apply(model):
            yield


class BoundEdits:
    """An `EditBank`'s rows for one batch, applied to a model through forward hooks.

    Holds views of the bank's rows: valid while those rows are not overwritten (`set_row`).
    """

    def __init__(self, bank: EditBank, rows: torch.Tensor | Sequence[int]) -> None:
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=bank.device)
        if rows_t.ndim != 1:
            raise ValueError("rows must be one bank row index per sequence")
        if len(rows_t) and (int(rows_t.min()) < 0 or int(rows_t.max()) >= bank.n_rows):
            raise IndexError(f"bank has rows 0..{bank.n_rows - 1}, got {rows_t.tolist()}")
        self.bank = bank
        self.n = len(rows_t)
        self.alpha, self.beta = bank.alpha[rows_t], bank.beta[rows_t]
        self.renorm = bank.renorm[rows_t]
        on = bank.active[rows_t] & ((self.alpha != 0) | (self.beta != 0))[:, None]  # [B, n_layers]
        self.slots = {
            slot: (
                bank.P[rows_t, slot],
                bank.N[rows_t, slot],
                bank.mu[rows_t, slot],
                bank.S[rows_t, slot],
                on[:, slot],
            )
            for slot, used in enumerate(on.any(0).tolist())
            if used
        }
        self.has_steer = bool(self.renorm.any()) or bool(bank.S[rows_t].any())
        self.change_ratios: dict[int, list[float]] | None = None
        self.start: torch.Tensor | None = None

    def from_position(self, start: torch.Tensor | Sequence[int]) -> BoundEdits:
        """Edit positions `start[i]` onward of row i, in one forward over whole sequences.

        Teacher forcing a prompt + answer with the edit from the prompt's last token onward
        computes exactly what generation computes with the `last` position rule (the edit hits
        the prompt's last token at prefill, then every new token), so it scores an edit's answers
        without generating them.
        """
        self.start = torch.as_tensor(start, dtype=torch.long, device=self.bank.device)
        return self

    def record_change(self) -> dict[int, list[float]]:
        """From now on, record mean ‖Δh‖/‖h‖ of the edited rows per bank layer (one entry per call)."""
        self.change_ratios = {self.bank.layers[slot]: [] for slot in self.slots}
        return self.change_ratios

    def _hook(self, slot: int):
        tensors = self.slots[slot]
        last = self.bank.positions == "last"
        layer = self.bank.layers[slot]
        moved: dict[torch.device, tuple] = {}

        def on_device(device: torch.device) -> tuple:
            # A model sharded over GPUs (device_map) has layers on several devices: bring this
            # layer's rows to its device once, not in every call.
            if device not in moved:
                moved[device] = tuple(x.to(device) for x in (*tensors, self.alpha, self.beta, self.renorm))
            return moved[device]

        def hook(module: nn.Module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            P, N, mu, S, on, alpha, beta, renorm = on_device(hidden.device)
            steer = S if self.has_steer else None
            start = None if self.start is None else self.start.to(hidden.device)
            if hidden.shape[0] != self.n:
                raise RuntimeError(f"edit rows for {self.n} sequences, batch has {hidden.shape[0]}")
            part = hidden[:, -1:, :] if last and start is None else hidden
            # Rows without an edit here keep their exact values (bit-identical to the base model).
            new = edit_rows(part, P, N, mu, alpha, beta, steer, renorm)
            mask = on[:, None, None]
            if start is not None:
                positions = torch.arange(part.shape[1], device=part.device)
                mask = mask & (positions[None, :, None] >= start[:, None, None])
            edited = torch.where(mask, new, part)
            if self.change_ratios is not None and on.any():
                ratio = (edited - part).float().norm(dim=-1) / part.float().norm(dim=-1).clamp_min(1e-6)
                self.change_ratios[layer].append(float(ratio[on].mean()))
            if last and start is None and hidden.shape[1] > 1:
                hidden = torch.cat([hidden[:, :-1, :], edited], dim=1)
            else:
                hidden = edited
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    @contextlib.contextmanager
    def apply(self, model: nn.Module) -> Iterator[None]:
        handles = [
            layer_module(model, self.bank.layers[slot], self.bank.site).register_forward_hook(
                self._hook(slot)
            )
            for slot in self.slots
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
