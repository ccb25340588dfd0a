"""Edit capacity of a model: how often its answers carry a marker under a hidden-state edit whose
direction is the change the model's own instruction for that marker makes.

`evaluation.capacity` measures what the model writes when the prompt asks for a marker. This
module asks the next question: can an edit of the form the project serves (additive, at the last
position of every forward call, through `EditBank`) make the model write it without being asked?
The direction is the best one the model itself offers: the mean change the marker's instruction
(appended after the user's message, where the model follows it) makes to the residual stream at
the prompt's last position, where the answer starts, at each edited layer. The directions come
from one set of users' prompts (`derive`) and are measured on another (`test`), so a direction
cannot simply replay the prompts it was taken from.

Strength 1 adds, at every edited layer, the whole change the instruction makes there. Each layer's
change already holds what the earlier layers passed on, so several layers compound: readable
strengths lie well below 1, and the answer degenerates (a marker repeated, no words) above them.
Each strength is therefore reported with the answers' closeness to the input tweet (ROUGE-L), and
a marker's capacity under the edit is its largest share among the strengths whose answers stay at
least `min_closeness` close to the input.

`measure_edit_transfer` then asks what such an edit would give as a personal part chosen from each
user's own history: the users whose history shows a marker answer under that marker's edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chameleon.core.edit import Edit
from chameleon.core.generation import generate_answers
from chameleon.core.marker_steering import MARKER_INSTRUCTIONS, instruction_directions, marker_edit
from chameleon.core.markers import MARKERS, history_shares, history_shows, text_markers
from chameleon.evaluation.capacity import readable_share
from chameleon.evaluation.lamp import extract_lamp7_tweet
from chameleon.evaluation.metrics import bootstrap_ci, rouge_per_item
from chameleon.evaluation.names import NO_PREAMBLE
from chameleon.evaluation.scoring import postprocess

__all__ = [
    "Answering",
    "measure_edit_capacity",
    "measure_edit_transfer",
]


@dataclass(frozen=True)
class Answering:
    """How the measured answers are made and summarized: the evaluation's prompt, greedy."""

    system: str | None = NO_PREAMBLE
    max_new_tokens: int = 48
    batch_size: int = 16
    n_resamples: int = 1000
    """Bootstrap resamples of each interval."""
    seed: int = 0

    def answers(self, model, tok, messages: Sequence[str], edit: Edit | None) -> tuple[list[str], float]:
        """Cleaned answers to ``messages`` (all under ``edit``) and their mean closeness (ROUGE-L)
        to the input tweets."""
        got = postprocess(
            generate_answers(
                model, tok, messages, edits=None if edit is None else [edit] * len(messages),
                system=self.system, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            )
        )  # fmt: skip
        tweets = [extract_lamp7_tweet(m) for m in messages]
        return got, sum(rouge_per_item(got, tweets)["rougeL"]) / len(got)


def measure_edit_capacity(
    model,
    tok,
    derive: Sequence[str],
    test: Sequence[str],
    *,
    layers: Sequence[int],
    strengths: Sequence[float],
    markers: Sequence[str] = MARKERS,
    min_closeness: float = 0.5,
    answering: Answering = Answering(),
) -> dict[str, Any]:
    """Answers to ``test`` without an edit and under each marker's instruction edit (directions
    from ``derive``) at each of ``strengths``. Returns ``{"layers", "min_closeness", "none":
    {"shares": {marker: share}, "closeness"}, "markers": {marker: {"by_strength": {strength:
    {"share", "ci95", "readable_share", "closeness"}}, "capacity", "at", "readable_capacity"}},
    "answers": {...}, "directions": {marker: [len(layers), d]}}``; ``capacity`` is the largest
    share among the readable strengths (mean closeness ≥ ``min_closeness``; the share without an
    edit when none is), ``at`` its strength (None: no readable strength beat no edit);
    ``readable_capacity`` the largest share, over no edit and every strength, of answers that
    carry the marker and are readable themselves (``core.markers.readable``).
    """
    unknown = [m for m in markers if m not in MARKER_INSTRUCTIONS]
    if unknown or not test or not strengths:
        raise ValueError(f"need test messages, strengths and known markers (unknown: {unknown})")
    base, base_closeness = answering.answers(model, tok, test, None)
    base_shares = {m: sum(text_markers(x)[m] for x in base) / len(base) for m in markers}
    answers: dict[str, list[str]] = {"none": base}
    out: dict[str, Any] = {
        "layers": list(layers),
        "min_closeness": min_closeness,
        "none": {"shares": base_shares, "closeness": base_closeness},
        "markers": {},
    }
    directions = instruction_directions(
        model, tok, derive, markers, layers, system=answering.system, batch_size=answering.batch_size
    )
    for m in markers:
        by_strength: dict[str, Any] = {}
        capacity, at = base_shares[m], None
        for s in strengths:
            got, closeness = answering.answers(model, tok, test, marker_edit(layers, s * directions[m]))
            answers[f"{m}@{s:g}"] = got
            carried = [float(text_markers(x)[m]) for x in got]
            ci = bootstrap_ci(carried, n_resamples=answering.n_resamples, seed=answering.seed)
            by_strength[f"{s:g}"] = {
                "share": ci.mean,
                "ci95": [ci.low, ci.high],
                "readable_share": readable_share(got, m),
                "closeness": closeness,
            }
            if closeness >= min_closeness and ci.mean > capacity:
                capacity, at = ci.mean, s
        readable_capacity = max(
            [readable_share(base, m), *(v["readable_share"] for v in by_strength.values())]
        )
        out["markers"][m] = {
            "by_strength": by_strength,
            "capacity": capacity,
            "at": at,
            "readable_capacity": readable_capacity,
        }
    out["answers"] = answers
    out["directions"] = directions
    return out


def measure_edit_transfer(
    model,
    tok,
    messages: Sequence[str],
    histories: Sequence[Sequence[str]],
    *,
    layers: Sequence[int],
    directions: dict[str, torch.Tensor],
    strengths: dict[str, float],
    answering: Answering = Answering(),
) -> dict[str, Any]:
    """What a marker part chosen from each user's own history would transfer: for each marker of
    ``strengths``, the users whose history shows it (``core.markers.history_shows``) answer their
    message unedited and under the marker's instruction edit at its strength. Returns per marker
    ``{"users", "strength", "base_share", "edited_share", "paired_gain": {"mean", "ci95"},
    "base_closeness", "edited_closeness"}`` (``users`` 0: no figures). Users whose history does not
    show a marker would get no such part, so their answers are the unedited ones by construction.
    """
    if len(messages) != len(histories):
        raise ValueError(f"{len(messages)} messages but {len(histories)} histories")
    shows = [history_shows(history_shares(h)) for h in histories]
    out: dict[str, Any] = {}
    for m, strength in strengths.items():
        msgs = [msg for msg, sh in zip(messages, shows, strict=True) if sh[m]]
        if not msgs:
            out[m] = {"users": 0, "strength": strength}
            continue
        edit = marker_edit(layers, strength * directions[m])
        (base, base_closeness), (edited, edited_closeness) = (
            answering.answers(model, tok, msgs, e) for e in (None, edit)
        )
        carried = {k: [float(text_markers(x)[m]) for x in v] for k, v in (("base", base), ("edited", edited))}
        gain = bootstrap_ci(
            [e - b for e, b in zip(carried["edited"], carried["base"], strict=True)],
            n_resamples=answering.n_resamples,
            seed=answering.seed,
        )
        out[m] = {
            "users": len(msgs),
            "strength": strength,
            "base_share": sum(carried["base"]) / len(msgs),
            "edited_share": sum(carried["edited"]) / len(msgs),
            "base_readable_share": readable_share(base, m),
            "edited_readable_share": readable_share(edited, m),
            "paired_gain": {"mean": gain.mean, "ci95": [gain.low, gain.high]},
            "base_closeness": base_closeness,
            "edited_closeness": edited_closeness,
        }
    return out
