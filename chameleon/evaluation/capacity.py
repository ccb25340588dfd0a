"""Style capacity of a model: how often its answers carry a marker when the prompt asks for it.

The ceiling any personalization can reach on that model: an edit that makes a user's answers carry
a marker (``core.markers``) does what the model can do at all; when the model does not produce a
marker even when told to, a missed marker-transfer goal is the model's, not the method's.

The prompt is the evaluation's own (the system turn ``NO_PREAMBLE``, the LaMP input as the user
turn, greedy, the same answer clean-up), with one instruction per marker added either to the
system turn or after the user's message (``placements``); a marker's capacity is the larger share
of the two. The share without any instruction is measured beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chameleon.core.generation import generate_answers
from chameleon.core.marker_steering import MARKER_INSTRUCTIONS, instructed_prompts
from chameleon.core.markers import MARKERS, readable, text_markers
from chameleon.evaluation.metrics import bootstrap_ci
from chameleon.evaluation.names import NO_PREAMBLE
from chameleon.evaluation.scoring import postprocess

__all__ = ["PLACEMENTS", "marker_shares", "measure_capacity", "readable_share"]

PLACEMENTS = ("system", "user")
"""Where an instruction goes: appended to the system turn, or after the user's message."""


def marker_shares(answers: Sequence[str]) -> dict[str, float]:
    """Per marker, the share of ``answers`` that carry it."""
    if not answers:
        raise ValueError("no answers")
    flags = [text_markers(a) for a in answers]
    return {m: sum(f[m] for f in flags) / len(flags) for m in MARKERS}


def readable_share(answers: Sequence[str], marker: str) -> float:
    """The share of ``answers`` that carry ``marker`` and stay readable (``core.markers.readable``)."""
    return sum(text_markers(a)[marker] and readable(a) for a in answers) / len(answers)


def measure_capacity(
    model,
    tok,
    messages: Sequence[str],
    *,
    system: str | None = NO_PREAMBLE,
    markers: Sequence[str] = MARKERS,
    placements: Sequence[str] = PLACEMENTS,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Answers to ``messages`` without an instruction and with each marker's instruction at each
    placement; returns ``{"none": {marker: share}, "markers": {marker: {"instruction", "by_placement":
    {placement: {"share", "ci95"}}, "capacity", "none"}}, "answers": {...}}``.

    ``capacity`` is the largest share over the placements (what the model does at best when asked).
    ``answers`` keeps the scored answers of every prompt (the caller decides whether to write them).
    """
    unknown = [m for m in markers if m not in MARKER_INSTRUCTIONS]
    bad = [p for p in placements if p not in PLACEMENTS]
    if unknown or bad or not placements:
        raise ValueError(f"unknown markers {unknown} or placements {bad} (known: {MARKERS}, {PLACEMENTS})")
    if not messages:
        raise ValueError("no messages")

    def answer(marker: str | None, placement: str) -> list[str]:
        msgs, sys_turn = instructed_prompts(messages, system, marker, placement)
        raw = generate_answers(
            model, tok, msgs, system=sys_turn, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        return postprocess(raw)

    answers: dict[str, list[str]] = {"none": answer(None, "system")}
    none = marker_shares(answers["none"])
    out: dict[str, Any] = {"none": none, "markers": {}}
    for m in markers:
        by_placement = {}
        for p in placements:
            answers[f"{m}@{p}"] = got = answer(m, p)
            carried = [float(text_markers(a)[m]) for a in got]
            ci = bootstrap_ci(carried, n_resamples=n_resamples, seed=seed)
            by_placement[p] = {
                "share": ci.mean,
                "ci95": [ci.low, ci.high],
                "readable_share": readable_share(got, m),
            }
        out["markers"][m] = {
            "instruction": MARKER_INSTRUCTIONS[m],
            "by_placement": by_placement,
            "capacity": max(v["share"] for v in by_placement.values()),
            "readable_capacity": max(v["readable_share"] for v in by_placement.values()),
            "none": none[m],
            "readable_none": readable_share(answers["none"], m),
        }
    out["answers"] = answers
    return out
