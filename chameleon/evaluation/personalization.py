"""Metrics that see personalization where ROUGE cannot, all computed from per-user vectors.

``per_user_table`` turns the scored answers into the ``per_user`` block of ``results.json`` (user
ids, the share of each user's unused history items carrying each style marker, and per method the
per-user ROUGE-L, closeness to the input, style attribution rank and marker flags; no text), and
``personalization_scores`` computes every figure from that block alone, so the figures of a
committed run can be recomputed without the LaMP text (``evaluation.recompute``):

- *style attribution* (``evaluation.attribution``): MRR and top-1 of the own user among 20;
- *marker transfer* (``core.markers``): for users whose unused history shows a marker, the share of
  answers that carry it, and the same share for users whose history does not;
- *closeness-adjusted gain*: the intercept of per-user ΔROUGE-L (method − reference) regressed on
  Δcloseness to the input (method − reference), with a bootstrap interval: the ROUGE-L gain a
  method would have without moving closer to the input. A ROUGE-L gain whose intercept interval is
  not above 0 is "format" (explained by copying the input more), not personalization.

Each comes with its paired comparison against ``base`` and against ``chameleon_global`` (when they
were run). Methods are any names: nothing here depends on which methods a run has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from chameleon.core.markers import HISTORY_THRESHOLDS, MARKERS, history_shares, readable, text_markers
from chameleon.evaluation import attribution
from chameleon.evaluation.metrics import bootstrap_ci
from chameleon.evaluation.scoring import paired_comparison
from chameleon.evaluation.style_goals import style_goals

__all__ = [
    "PERSONALIZATION_REFERENCES",
    "closeness_adjusted_gain",
    "figures_from_per_user",
    "per_user_table",
    "personalization_results",
    "personalization_scores",
]

PERSONALIZATION_REFERENCES = ("base", "chameleon_global")
"""Methods every personalization figure is compared with (paired), when present."""


def per_user_table(
    user_ids: Sequence[str],
    references: Sequence[Sequence[str]],
    predictions: dict[str, Sequence[str]],
    scores: dict[str, dict[str, Any]],
    *,
    marker_parts: Sequence[Sequence[str]] | None = None,
    n_candidates: int = attribution.N_CANDIDATES,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``per_user`` block: ``user_ids``, ``history_lower_start_share`` and
    ``history_marker_shares`` ({marker: per user}) of each user's unused history (``references``),
    the attribution draw, ``marker_parts`` (per user, the markers the run's served rows add; only
    when given), and ``methods``: {method: {"rougeL", "closeness", "style", "attribution_rank",
    "lower_start", <every other marker>, "readable" (``core.markers.readable``): per user}},
    aligned with ``user_ids``.

    ``scores`` are :func:`scoring.score_methods`' (with style references and inputs, so each
    method's ``per_user`` has ``rougeL``, ``rougeL_vs_input`` and ``style``); ``predictions`` the
    scored (post-processed) answers.
    """
    n = len(user_ids)
    if len(references) != n or (marker_parts is not None and len(marker_parts) != n):
        raise ValueError(f"{n} users but {len(references)} reference lists or marker parts")
    shares = [history_shares(r) for r in references]
    cands = attribution.candidate_sets(list(user_ids), n_candidates=n_candidates, seed=seed)
    profiles = attribution.profiles_of(references)
    methods: dict[str, dict[str, list]] = {}
    for m, answers in predictions.items():
        if len(answers) != n:
            raise ValueError(f"method {m}: {len(answers)} answers for {n} users")
        per = scores[m]["per_user"]
        flags = [text_markers(a) for a in answers]
        methods[m] = {
            "rougeL": [float(x) for x in per["rougeL"]],
            "closeness": [float(x) for x in per["rougeL_vs_input"]],
            "style": [float(x) for x in per["style"]],
            "attribution_rank": attribution.attribution_ranks(
                answers, references, cands, user_ids, seed=seed, profiles=profiles
            ),
            **{mk: [int(f[mk]) for f in flags] for mk in MARKERS},
            "readable": [int(readable(a)) for a in answers],
        }
    parts = {} if marker_parts is None else {"marker_parts": [list(p) for p in marker_parts]}
    return {
        "user_ids": [str(u) for u in user_ids],
        "history_lower_start_share": [s["lower_start"] for s in shares],
        "history_marker_shares": {mk: [s[mk] for s in shares] for mk in MARKERS},
        "history_thresholds": dict(HISTORY_THRESHOLDS),
        "attribution": {"n_candidates": min(n_candidates, n), "seed": seed},
        **parts,
        "methods": methods,
    }


# --------------------------------------------------------------------------- closeness-adjusted gain


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intercepts and slopes of y on x, row-wise (a constant x has slope 0: the intercept is ȳ)."""
    mx, my = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
    var = ((x - mx) ** 2).sum(-1)
    cov = ((x - mx) * (y - my)).sum(-1)
    slope = np.where(var > 1e-18, cov / np.where(var > 1e-18, var, 1.0), 0.0)
    return my[..., 0] - slope * mx[..., 0], slope


def closeness_adjusted_gain(
    d_rouge: Sequence[float], d_closeness: Sequence[float], n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Intercept (and slope) of the OLS line of per-user ΔROUGE-L on Δcloseness, with percentile
    bootstrap intervals (users resampled); ``above_zero`` when the intercept's interval is."""
    y, x = np.asarray(d_rouge, dtype=float), np.asarray(d_closeness, dtype=float)
    if y.shape != x.shape or y.ndim != 1 or y.size < 2:
        raise ValueError(f"need two paired vectors of >= 2 users, got {y.shape} and {x.shape}")
    b0, b1 = _ols(x[None], y[None])
    idx = np.random.default_rng(seed).integers(0, y.size, size=(n_resamples, y.size))
    bb0, bb1 = _ols(x[idx], y[idx])
    lo, hi = np.percentile(bb0, [2.5, 97.5])
    slo, shi = np.percentile(bb1, [2.5, 97.5])
    return {
        "intercept": float(b0[0]),
        "intercept_ci95": [float(lo), float(hi)],
        "slope": float(b1[0]),
        "slope_ci95": [float(slo), float(shi)],
        "mean_d_rougeL": float(y.mean()),
        "mean_d_closeness": float(x.mean()),
        "above_zero": bool(lo > 0),
    }


# --------------------------------------------------------------------------- from the per_user block


def _refs_for(method: str, methods: dict[str, Any], references: Sequence[str]) -> list[str]:
    return [r for r in references if r in methods and r != method]


def _attribution(per_user: dict[str, Any], references: Sequence[str], n_resamples: int, seed: int):
    M = per_user["methods"]
    n_c = per_user["attribution"]["n_candidates"]
    out: dict[str, Any] = {
        "n_candidates": n_c,
        "chance_mrr": attribution.chance_mrr(n_c),
        "chance_top1": 1.0 / n_c,
        "methods": {},
    }
    rr = {m: 1.0 / np.asarray(e["attribution_rank"], dtype=float) for m, e in M.items()}
    hit = {m: (np.asarray(e["attribution_rank"]) == 1).astype(float) for m, e in M.items()}
    for m in M:
        mrr_ci = bootstrap_ci(rr[m], n_resamples=n_resamples, seed=seed)
        top_ci = bootstrap_ci(hit[m], n_resamples=n_resamples, seed=seed)
        entry: dict[str, Any] = {
            "mrr": mrr_ci.mean,
            "mrr_ci95": [mrr_ci.low, mrr_ci.high],
            "top1": top_ci.mean,
            "top1_ci95": [top_ci.low, top_ci.high],
        }
        for ref in _refs_for(m, M, references):
            entry[f"vs_{ref}"] = {
                "mrr": paired_comparison(rr[m], rr[ref], n_resamples, seed),
                "top1": paired_comparison(hit[m], hit[ref], n_resamples, seed),
            }
        out["methods"][m] = entry
    return out


def _markers(per_user: dict[str, Any], references: Sequence[str], n_resamples: int, seed: int):
    """Per marker: shares among the users whose unused history shows it, and among the others."""
    out: dict[str, Any] = {}
    for mk in MARKERS:
        if not all(mk in e for e in per_user["methods"].values()):
            continue
        shows = np.asarray(per_user["history_marker_shares"][mk]) >= per_user["history_thresholds"][mk]
        out[mk] = {
            "threshold": per_user["history_thresholds"][mk],
            **_shares_with_and_without(per_user["methods"], mk, shows, references, n_resamples, seed),
        }
    return out


def _served_markers(per_user: dict[str, Any], references: Sequence[str], n_resamples: int, seed: int):
    """Per marker of the run's marker parts: shares among the users whose served row adds it (the
    run's own choice, from their history without the reference items), and among the others."""
    parts = per_user.get("marker_parts")
    if parts is None:
        return {}
    served = sorted({mk for p in parts for mk in p}, key=MARKERS.index)
    return {
        mk: _shares_with_and_without(
            per_user["methods"],
            mk,
            np.array([mk in p for p in parts]),
            references,
            n_resamples,
            seed,
            readable_too=True,
        )
        for mk in served
        if all(mk in e for e in per_user["methods"].values())
    }


def _shares_with_and_without(
    M: dict[str, Any],
    mk: str,
    shows: np.ndarray,
    references: Sequence[str],
    n_resamples: int,
    seed: int,
    readable_too: bool = False,
) -> dict[str, Any]:
    """``n_with``, ``n_without`` and per method the share of answers carrying ``mk`` on each side
    of ``shows``, each paired against the references (``readable_too``: also the share that carry
    it in a readable answer)."""
    entry: dict[str, Any] = {"n_with": int(shows.sum()), "n_without": int((~shows).sum()), "methods": {}}
    for m, e in M.items():
        carried = np.asarray(e[mk], dtype=float)
        me: dict[str, Any] = {}
        for side, sel in (("with", shows), ("without", ~shows)):
            if not sel.any():
                me[side] = None
                continue
            ci = bootstrap_ci(carried[sel], n_resamples=n_resamples, seed=seed)
            se: dict[str, Any] = {"share": ci.mean, "ci95": [ci.low, ci.high]}
            if readable_too and "readable" in e:  # carried in an answer that is more than markers
                se["readable_share"] = float((carried * np.asarray(e["readable"]))[sel].mean())
            for ref in _refs_for(m, M, references):
                se[f"vs_{ref}"] = paired_comparison(
                    carried[sel], np.asarray(M[ref][mk], dtype=float)[sel], n_resamples, seed
                )
            me[side] = se
        entry["methods"][m] = me
    return entry


def _closeness_adjusted(per_user: dict[str, Any], references: Sequence[str], n_resamples: int, seed: int):
    M = per_user["methods"]
    out: dict[str, Any] = {}
    if len(per_user["user_ids"]) < 2:  # a regression line needs two users
        return out
    for m, e in M.items():
        entry = {}
        for ref in _refs_for(m, M, references):
            d_r = np.asarray(e["rougeL"]) - np.asarray(M[ref]["rougeL"])
            d_c = np.asarray(e["closeness"]) - np.asarray(M[ref]["closeness"])
            entry[f"vs_{ref}"] = closeness_adjusted_gain(d_r, d_c, n_resamples, seed)
        if entry:
            out[m] = entry
    return out


def personalization_scores(
    per_user: dict[str, Any],
    *,
    references: Sequence[str] = PERSONALIZATION_REFERENCES,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Attribution, marker transfer and closeness-adjusted gain of every method in ``per_user``
    (the block :func:`per_user_table` writes), each compared with each of ``references`` present:
    ``{"attribution": ..., "markers": ..., "closeness_adjusted": ...}``."""
    n = len(per_user["user_ids"])
    for m, e in per_user["methods"].items():
        bad = [k for k, v in e.items() if len(v) != n]
        if bad:
            raise ValueError(f"per_user of {m}: {bad} not aligned with {n} user ids")
    if len(per_user.get("marker_parts", [None] * n)) != n:
        raise ValueError(f"per_user marker_parts not aligned with {n} user ids")
    return {
        "references": [r for r in references if r in per_user["methods"]],
        "attribution": _attribution(per_user, references, n_resamples, seed),
        "markers": _markers(per_user, references, n_resamples, seed),
        # Runs with marker parts only (older results.json files have no such block).
        **(
            {"served_markers": _served_markers(per_user, references, n_resamples, seed)}
            if "marker_parts" in per_user
            else {}
        ),
        "closeness_adjusted": _closeness_adjusted(per_user, references, n_resamples, seed),
    }


def figures_from_per_user(per_user: dict[str, Any], n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything results.json derives from the ``per_user`` block: ``personalization`` (the
    figures of :func:`personalization_scores`) and ``style_goals`` (issue 18's goal rows)."""
    pers = personalization_scores(per_user, n_resamples=n_resamples, seed=seed)
    return {"personalization": pers, "style_goals": style_goals(per_user, pers, n_resamples, seed)}


def personalization_results(
    user_ids: Sequence[str],
    references: Sequence[Sequence[str]],
    predictions: dict[str, Sequence[str]],
    scores: dict[str, dict[str, Any]],
    *,
    marker_parts: Sequence[Sequence[str]] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """What the evaluation adds to results.json: ``per_user`` (:func:`per_user_table`) and the
    figures and goals computed from it (:func:`figures_from_per_user`)."""
    per_user = per_user_table(user_ids, references, predictions, scores, marker_parts=marker_parts, seed=seed)
    return {**figures_from_per_user(per_user, n_resamples, seed), "per_user": per_user}
