"""The goals of issue 18 (personalization, not format), judged from the ``per_user`` block alone.

Each goal is one row: ``{"goal", "evaluated", "met", "figure", ...numbers}``; a goal whose methods
a run lacks is ``{"evaluated": False, "met": None, "figure": "not run: ..."}``, never an error.

- ``group_rougeL_keeps_format_gain``: the composed group edit's ROUGE-L ≥ 1.10 × base (paired
  interval of the difference above 0) and ≥ the global edit's − 0.005;
- ``specificity_attribution``: ``chameleon_user`` above ``swapped_residual``, or ``chameleon_group``
  above ``chameleon_global``, in style-attribution MRR with the paired 95 % interval above 0;
- ``group_closeness_adjusted_gain``: the composed group edit's closeness-adjusted gain over base
  with its interval above 0;
- ``marker_transfer``: for the group or the user edit, at least one marker whose share among the
  users whose history shows it is above base (paired interval above 0) while among the other users
  it is not (interval not above 0);
- ``random_residual_within_5pct_of_global``: ``random_residual`` ROUGE-L within ±5 % of the global
  edit's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chameleon.evaluation.scoring import paired_comparison

__all__ = ["STYLE_GOALS", "style_goals"]

GROUP_REL_VS_BASE = 0.10
GLOBAL_MARGIN = 0.005
RANDOM_WITHIN = 0.05

STYLE_GOALS = {
    "group_rougeL_keeps_format_gain": "composed group ROUGE-L ≥ 1.10 × base and ≥ global − 0.005",
    "specificity_attribution": "user > swapped_residual or group > global in attribution MRR (paired CI > 0)",
    "group_closeness_adjusted_gain": "closeness-adjusted gain of the group edit over base, CI > 0",
    "marker_transfer": "a marker above base (CI > 0) for users who have it, not above base for users who don't",
    "random_residual_within_5pct_of_global": "random_residual ROUGE-L within ±5 % of the global edit",
}
"""Every goal's name and what it asks."""


def _missing(goal: str, needed: list[str], methods: dict[str, Any]) -> dict[str, Any] | None:
    absent = [m for m in needed if m not in methods]
    if not absent:
        return None
    return {
        "goal": STYLE_GOALS[goal],
        "evaluated": False,
        "met": None,
        "figure": f"not run: {', '.join(absent)} missing from this run",
    }


def _rouge_goal(M: dict[str, Any], n_resamples: int, seed: int) -> dict[str, Any]:
    name = "group_rougeL_keeps_format_gain"
    miss = _missing(name, ["chameleon_group", "base", "chameleon_global"], M)
    if miss:
        return miss
    g, b, gl = (np.asarray(M[m]["rougeL"]) for m in ("chameleon_group", "base", "chameleon_global"))
    vb = paired_comparison(g, b, n_resamples, seed)
    vg = paired_comparison(g, gl, n_resamples, seed)
    met = vb["rel"] is not None and vb["rel"] >= GROUP_REL_VS_BASE and vb["diff_ci95"][0] > 0
    met = met and vg["diff"] >= -GLOBAL_MARGIN
    rel = "n/a" if vb["rel"] is None else f"{vb['rel'] * 100:+.1f} %"
    return {
        "goal": STYLE_GOALS[name],
        "evaluated": True,
        "met": bool(met),
        "figure": (
            f"vs base {rel} (diff {vb['diff']:+.4f} [{vb['diff_ci95'][0]:+.4f}, {vb['diff_ci95'][1]:+.4f}]); "
            f"vs global {vg['diff']:+.4f} [{vg['diff_ci95'][0]:+.4f}, {vg['diff_ci95'][1]:+.4f}]"
        ),
        "rel_vs_base": vb["rel"],
        "diff_vs_base_ci95": vb["diff_ci95"],
        "diff_vs_global": vg["diff"],
        "diff_vs_global_ci95": vg["diff_ci95"],
    }


def _specificity(M: dict[str, Any], n_resamples: int, seed: int) -> dict[str, Any]:
    name = "specificity_attribution"
    pairs = [("chameleon_user", "swapped_residual"), ("chameleon_group", "chameleon_global")]
    present = [(a, b) for a, b in pairs if a in M and b in M]
    if not present:
        return _missing(name, sorted({m for p in pairs for m in p} - set(M)), M) or {}
    comparisons, parts, met = {}, [], False
    for a, b in present:
        rr = {m: 1.0 / np.asarray(M[m]["attribution_rank"], dtype=float) for m in (a, b)}
        c = paired_comparison(rr[a], rr[b], n_resamples, seed)
        comparisons[f"{a}_vs_{b}"] = c
        met = met or c["diff_ci95"][0] > 0
        parts.append(f"{a} − {b}: MRR {c['diff']:+.4f} [{c['diff_ci95'][0]:+.4f}, {c['diff_ci95'][1]:+.4f}]")
    not_run = [f"{a} vs {b}" for a, b in pairs if (a, b) not in present]
    if not_run:
        parts.append("not run: " + ", ".join(not_run))
    return {
        "goal": STYLE_GOALS[name],
        "evaluated": True,
        "met": bool(met),
        "figure": "; ".join(parts),
        "comparisons": comparisons,
    }


def _closeness_goal(pers: dict[str, Any]) -> dict[str, Any]:
    name = "group_closeness_adjusted_gain"
    c = pers["closeness_adjusted"].get("chameleon_group", {}).get("vs_base")
    if c is None:
        return {
            "goal": STYLE_GOALS[name],
            "evaluated": False,
            "met": None,
            "figure": "not run: chameleon_group or base missing from this run",
        }
    lo, hi = c["intercept_ci95"]
    return {
        "goal": STYLE_GOALS[name],
        "evaluated": True,
        "met": bool(c["above_zero"]),
        "figure": f"intercept {c['intercept']:+.4f} [{lo:+.4f}, {hi:+.4f}], slope {c['slope']:.3f}",
        "intercept": c["intercept"],
        "intercept_ci95": c["intercept_ci95"],
    }


def _marker_goal(pers: dict[str, Any]) -> dict[str, Any]:
    name = "marker_transfer"
    methods = [m for m in ("chameleon_group", "chameleon_user") if m in pers["attribution"]["methods"]]
    if not methods or "base" not in pers["attribution"]["methods"]:
        return {
            "goal": STYLE_GOALS[name],
            "evaluated": False,
            "met": None,
            "figure": "not run: base and chameleon_group or chameleon_user needed",
        }
    transferred, parts = [], []
    for m in methods:
        for mk, e in pers["markers"].items():
            w, wo = e["methods"][m]["with"], e["methods"][m]["without"]
            if w is None:
                continue
            up = w["vs_base"]["diff_ci95"][0] > 0
            leak = wo is not None and wo["vs_base"]["diff_ci95"][0] > 0
            if up and not leak:
                transferred.append(f"{m}:{mk}")
            parts.append(f"{m} {mk} {w['vs_base']['diff']:+.3f}")
    best = ", ".join(parts) if parts else "no user shows any marker"
    return {
        "goal": STYLE_GOALS[name],
        "evaluated": True,
        "met": bool(transferred),
        "figure": ("transferred: " + ", ".join(transferred) if transferred else "none transferred")
        + f" (share − base among users with the marker: {best})",
        "transferred": transferred,
    }


def _random_goal(M: dict[str, Any], n_resamples: int, seed: int) -> dict[str, Any]:
    name = "random_residual_within_5pct_of_global"
    miss = _missing(name, ["random_residual", "chameleon_global"], M)
    if miss:
        return miss
    c = paired_comparison(M["random_residual"]["rougeL"], M["chameleon_global"]["rougeL"], n_resamples, seed)
    met = c["rel"] is not None and abs(c["rel"]) <= RANDOM_WITHIN
    rel = "n/a" if c["rel"] is None else f"{c['rel'] * 100:+.1f} %"
    return {
        "goal": STYLE_GOALS[name],
        "evaluated": True,
        "met": bool(met),
        "figure": f"{rel} (diff {c['diff']:+.4f} [{c['diff_ci95'][0]:+.4f}, {c['diff_ci95'][1]:+.4f}])",
        "rel": c["rel"],
    }


def style_goals(
    per_user: dict[str, Any], pers: dict[str, Any], n_resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Every goal of :data:`STYLE_GOALS`, from the ``per_user`` block and its
    :func:`personalization.personalization_scores`."""
    M = per_user["methods"]
    return {
        "group_rougeL_keeps_format_gain": _rouge_goal(M, n_resamples, seed),
        "specificity_attribution": _specificity(M, n_resamples, seed),
        "group_closeness_adjusted_gain": _closeness_goal(pers),
        "marker_transfer": _marker_goal(pers),
        "random_residual_within_5pct_of_global": _random_goal(M, n_resamples, seed),
    }
