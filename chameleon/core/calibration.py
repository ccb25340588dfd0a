"""Self-calibration: choose an edit's layer and strength from the users' own held-out texts.

For a unit (a group, or one user) the job holds out a few history items it did not use for the
pairs: real texts with their (faked) queries. Each candidate edit, a steering direction at one
layer scaled to a strength relative to that layer's typical state norm, is scored by the mean
teacher-forced negative log-likelihood of those real texts given their queries, with the edit
applied exactly as at inference (from the prompt's last token onward). Strength 0, the base
model, is always a candidate, so a calibrated edit never makes the held-out texts less likely
than the base model does.

    curve = nll_curve(model, tok, prompts, answers, directions, norms, layers, strengths, site)
    choice = choose(curve)       # (layer, strength, nll) with the lowest NLL; strength 0 if none helps
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from chameleon.core.edit import Edit, EditBank
from chameleon.core.model import cache_argument, model_device


@dataclass
class Calibration:
    """The chosen (layer, strength) of one unit and the NLL of every candidate."""

    layer: int
    """The chosen layer; -1 when no candidate beat the base model."""
    strength: float
    """The chosen strength relative to the layer's typical state norm; 0 = no edit."""
    nll: float
    base_nll: float
    curve: dict[str, float] = field(default_factory=dict)
    """"layer:strength" -> mean NLL per token of the held-out texts; "base" -> without an edit."""
    change: dict[str, float] = field(default_factory=dict)
    """"layer:strength" -> mean ‖Δh‖/‖h‖ the edit made at its layer on the held-out texts."""
    members: dict[str, float] = field(default_factory=dict)
    """Residual composition: user id -> the user's own residual strength, for members calibrated
    on their own held-out items."""

    @property
    def active(self) -> bool:
        return self.strength > 0

    @property
    def best_layer(self) -> int:
        """The layer of the lowest-NLL candidate, even when it did not beat the base model."""
        keys = [k for k in self.curve if k != "base"]
        return int(min(keys, key=lambda k: self.curve[k]).split(":")[0]) if keys else self.layer

    def summary(self) -> dict[str, float]:
        return {
            "layer": self.layer,
            "strength": self.strength,
            "nll": round(self.nll, 5),
            "base_nll": round(self.base_nll, 5),
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "strength": self.strength,
            "nll": round(self.nll, 5),
            "base_nll": round(self.base_nll, 5),
            "curve": {k: round(v, 5) for k, v in self.curve.items()},
            "change_ratio": {k: round(v, 5) for k, v in self.change.items()},
            **({"members": dict(self.members)} if self.members else {}),
        }


def encode_answers(tok, prompts: Sequence[str], answers: Sequence[str], max_answer_tokens: int = 96):
    """Left-padded ids of prompt + answer, the answer-token mask, and where each answer starts."""
    rows, starts, lengths = [], [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        rows.append(p + a)
        starts.append(len(p))
        lengths.append(len(a))
    T = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    answer_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    first = []
    for i, r in enumerate(rows):
        off = T - len(r)
        ids[i, off:] = torch.tensor(r)
        attention[i, off:] = 1
        answer_mask[i, off + starts[i] : off + starts[i] + lengths[i]] = True
        first.append(off + starts[i])
    return ids, attention, answer_mask, torch.tensor(first)


def answer_nll(
    model,
    tok,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    bank: EditBank | None = None,
    row: int = 0,
    batch_size: int = 16,
    change: list[float] | None = None,
) -> float:
    """Mean NLL per answer token of `answers` given rendered `prompts`, with bank row `row` applied
    from each prompt's last token onward (row 0 / no bank = the base model). With `change`, the
    edit's mean ‖Δh‖/‖h‖ of each batch is appended to it."""
    changes = [change] if change is not None else None
    return answer_nlls(
        model, tok, prompts, answers, bank=bank, rows=[row], batch_size=batch_size, changes=changes
    )[0]


def answer_nlls(
    model,
    tok,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    bank: EditBank | None,
    rows: Sequence[int],
    batch_size: int = 16,
    changes: Sequence[list[float]] | None = None,
) -> list[float]:
    """`answer_nll` for each bank row of `rows` (every answer under the same row), in one pass."""
    assignments = [[row] * len(prompts) for row in rows]
    sums, counts = sequence_nlls(
        model,
        tok,
        prompts,
        answers,
        bank=bank,
        assignments=assignments,
        batch_size=batch_size,
        changes=changes,
    )
    total = max(sum(counts), 1)
    return [sum(per_answer) / total for per_answer in sums]


@torch.no_grad()
def sequence_nlls(
    model,
    tok,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    bank: EditBank | None,
    assignments: Sequence[Sequence[int]],
    batch_size: int = 16,
    changes: Sequence[list[float]] | None = None,
) -> tuple[list[list[float]], list[int]]:
    """Per answer, the summed NLL of its tokens under each assignment of bank rows, and its token
    count: `assignments[i][j]` is the row edited into answer j under assignment i (0 = none),
    from its prompt's last token onward. Rows may differ within a batch (the bank edits each
    sequence with its own row), so the candidates of many units share one forward per batch.

    No row edits a position before its prompt's last token, so the positions every row of a batch
    has before that (the system prompt and the query, for all but the longest answer) are the
    same under every assignment: they run once per batch, and each assignment's forward starts
    from their KV cache (a copy: the forward extends it). With `changes`, each edited
    assignment's mean ‖Δh‖/‖h‖ of each batch is appended to `changes[i]`."""
    device = model_device(model)
    decoder = model.get_decoder()
    cache_kw = cache_argument(decoder)
    sums = [[0.0] * len(prompts) for _ in assignments]
    counts = [0] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        ids, attention, answer_mask, first = encode_answers(tok, prompts[start:stop], answers[start:stop])
        ids, attention, answer_mask = ids.to(device), attention.to(device), answer_mask.to(device)
        # Positions [0, cut) precede every row's edit (an edit starts at its prompt's last token).
        cut = max(int(first.min()) - 1, 0)
        prefix = None
        if cut:
            out = decoder(input_ids=ids[:, :cut], attention_mask=attention[:, :cut], use_cache=True)
            prefix = getattr(out, cache_kw, None)
            prefix = out.past_key_values if prefix is None else prefix
        # Token t is predicted at position t-1; the vocabulary projection runs on answer positions only.
        predicting = answer_mask[:, cut + 1 :]
        targets = ids[:, cut + 1 :][predicting]
        owner = torch.arange(len(ids), device=device)[:, None].expand_as(predicting)[predicting]
        counts[start:stop] = predicting.sum(1).tolist()
        for i, assignment in enumerate(assignments):
            batch_rows = [int(r) for r in assignment[start:stop]]
            ratios = None
            with contextlib.ExitStack() as stack:
                if bank is not None and any(batch_rows):
                    bound = bank.bind(batch_rows).from_position(first - 1 - cut)
                    ratios = bound.record_change() if changes is not None else None
                    stack.enter_context(bound.apply(model))
                hidden = decoder(
                    input_ids=ids[:, cut:],
                    attention_mask=attention,
                    use_cache=prefix is not None,
                    **{cache_kw: copy.deepcopy(prefix)},
                ).last_hidden_state
            logits = model.get_output_embeddings()(hidden[:, :-1][predicting])
            token_nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
            per_answer = torch.zeros(len(ids), dtype=torch.float64, device=device)
            sums[i][start:stop] = per_answer.index_add_(0, owner, token_nll.double()).tolist()
            if changes is not None and ratios:
                # A ratio is a mean over the positions the forward ran; rescaled to the whole
                # sequence's (the unedited prefix adds zeros), as if it had run from position 0.
                scale = (ids.shape[1] - cut) / ids.shape[1]
                changes[i].extend(r * scale for values in ratios.values() for r in values)
    return sums, counts


def steering_edit(
    layer: int, direction: torch.Tensor, norm: float, strength: float, *, site: str, renorm: bool
) -> Edit:
    """A one-layer additive edit: `strength` × the layer's typical state norm along `direction`."""
    unit = direction / direction.norm().clamp_min(1e-12)
    return Edit.additive([layer], (strength * norm * unit)[None], site=site, renorm=renorm)


def nll_curve(
    model,
    tok,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    directions: torch.Tensor,
    norms: torch.Tensor,
    layers: Sequence[int],
    strengths: Sequence[float],
    site: str,
    renorm: bool = False,
    batch_size: int = 16,
    change: dict[str, float] | None = None,
    offset: torch.Tensor | None = None,
) -> dict[str, float]:
    """NLL of the held-out answers for every (layer, strength) candidate; "base" = no edit.

    directions [L, d] and norms [L] are per entry of `layers`. With `change`, each candidate's
    mean ‖Δh‖/‖h‖ at its layer is stored there under the same key. `offset` [d] (one layer
    only): a fixed steering vector under every candidate, and "base" is the offset alone (a
    residual's strength is chosen on top of the shared edit; strength 0 = the shared edit alone).
    """
    if offset is not None and len(layers) != 1:
        raise ValueError("an offset calibrates candidates of one layer")
    bank = EditBank(directions.shape[-1], layers, site=site, max_rank=1, device=model_device(model))
    base_row = _add_offset(bank, layers[0], offset, site=site, renorm=renorm)
    candidates = [(i, s) for i in range(len(layers)) for s in strengths if s > 0]
    rows = bank.add_many(
        [
            candidate_edit(layers[i], directions[i], float(norms[i]), s, offset, site=site, renorm=renorm)
            for i, s in candidates
        ]
    )
    keys = [f"{layers[i]}:{s:g}" for i, s in candidates]
    ratios: list[list[float]] = [[] for _ in range(1 + len(rows))]
    nlls = answer_nlls(
        model, tok, prompts, answers, bank=bank, rows=[base_row, *rows], batch_size=batch_size, changes=ratios
    )
    curve = {"base": nlls[0], **dict(zip(keys, nlls[1:], strict=True))}
    if change is not None:
        change.update({key: sum(r) / len(r) for key, r in zip(keys, ratios[1:], strict=True) if r})
    return curve


@dataclass
class UnitItems:
    """One unit's own candidate direction and norm (at the layer calibrated), and its held-out items."""

    direction: torch.Tensor
    """[d]"""
    norm: float
    prompts: list[str]
    answers: list[str]


def unit_curves(
    model,
    tok,
    units: Sequence[UnitItems],
    *,
    layer: int,
    strengths: Sequence[float],
    site: str,
    offset: torch.Tensor | None = None,
    renorm: bool = False,
    batch_size: int = 16,
    units_per_bank: int = 64,
) -> list[dict[str, float]]:
    """`nll_curve` of many units at one layer, each on its own items: the curve of unit u is that
    of `nll_curve(u.prompts, u.answers, directions=u.direction[None], norms=[u.norm], ...)`. The
    units' items run in shared batches, each answer under its own unit's candidate row, so a
    thousand small units cost a few full batches per strength instead of a thousand tiny ones.
    A bank holds `units_per_bank` units' candidates at a time (memory: units × strengths × d)."""
    positive = [s for s in strengths if s > 0]
    curves = []
    for start in range(0, len(units), units_per_bank):
        chunk = units[start : start + units_per_bank]
        d = chunk[0].direction.shape[-1]
        bank = EditBank(d, [layer], site=site, max_rank=1, device=model_device(model))
        base_row = _add_offset(bank, layer, offset, site=site, renorm=renorm)
        rows = bank.add_many(
            [
                candidate_edit(layer, u.direction, u.norm, s, offset, site=site, renorm=renorm)
                for u in chunk
                for s in positive
            ]
        )
        owners = [k for k, u in enumerate(chunk) for _ in u.prompts]
        prompts = [p for u in chunk for p in u.prompts]
        answers = [a for u in chunk for a in u.answers]
        assignments = [[base_row] * len(owners)]
        assignments += [[rows[k * len(positive) + j] for k in owners] for j in range(len(positive))]
        sums, counts = sequence_nlls(
            model, tok, prompts, answers, bank=bank, assignments=assignments, batch_size=batch_size
        )
        for k in range(len(chunk)):
            mine = [i for i, owner in enumerate(owners) if owner == k]
            tokens = max(sum(counts[i] for i in mine), 1)
            nll = [sum(per_answer[i] for i in mine) / tokens for per_answer in sums]
            curves.append(
                {"base": nll[0], **{f"{layer}:{s:g}": v for s, v in zip(positive, nll[1:], strict=True)}}
            )
    return curves


def candidate_edit(
    layer: int,
    direction: torch.Tensor,
    norm: float,
    strength: float,
    offset: torch.Tensor | None,
    *,
    site: str,
    renorm: bool,
) -> Edit:
    """A candidate: `strength` × `norm` along `direction`, plus the fixed `offset` when given."""
    step = strength * norm * direction / direction.norm().clamp_min(1e-12)
    vector = step if offset is None else step + offset
    return steering_edit(layer, vector, float(vector.norm()), 1.0, site=site, renorm=renorm)


def _add_offset(bank: EditBank, layer: int, offset: torch.Tensor | None, *, site: str, renorm: bool) -> int:
    """The bank row of the offset alone (every candidate's baseline); row 0 when there is none."""
    if offset is None:
        return 0
    unit = offset / offset.norm().clamp_min(1e-12)
    return bank.add(steering_edit(layer, unit, float(offset.norm()), 1.0, site=site, renorm=renorm))


def choose(curve: dict[str, float], min_gain: float = 0.0) -> Calibration:
    """The candidate with the lowest NLL; the base model unless one beats it by more than `min_gain`."""
    base = curve["base"]
    best_key = min((k for k in curve if k != "base"), key=lambda k: curve[k], default=None)
    if best_key is None or curve[best_key] >= base - min_gain:
        return Calibration(layer=-1, strength=0.0, nll=base, base_nll=base, curve=dict(curve))
    layer, strength = best_key.split(":")
    return Calibration(
        layer=int(layer), strength=float(strength), nll=curve[best_key], base_nll=base, curve=dict(curve)
    )
