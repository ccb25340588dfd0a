"""Scores of every method on the same users: ROUGE-1/L, bootstrap intervals, paired tests, the goal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from chameleon.evaluation import metrics
from chameleon.evaluation.names import GOAL_REL_ROUGE_L, REFERENCES

__all__ = ["goal_verdict", "paired_comparison", "postprocess", "score_methods", "strip_per_user"]

METRICS = ("rouge1", "rougeL")


def postprocess(raw: Sequence[str]) -> list[str]:
    """The scored answers of raw generations (:func:`metrics.first_answer_line` of each)."""
    return [metrics.first_answer_line(x) for x in raw]


def _ci(values: Sequence[float], n_resamples: int, seed: int) -> dict[str, Any]:
    ci = metrics.bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return {"mean": ci.mean, "ci95": [ci.low, ci.high]}


def paired_comparison(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """``a`` vs ``b`` per user: mean difference with its paired-bootstrap 95 % interval and p-value,
    the exact sign test, and the relative difference ``mean(a)/mean(b) - 1``."""
    pb = metrics.paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed)
    st = metrics.paired_sign_test(a, b)
    mb = float(np.mean(b))
    return {
        "diff": pb.mean_diff,
        "diff_ci95": [pb.low, pb.high],
        "p_bootstrap": pb.p_value,
        "rel": (float(np.mean(a)) / mb - 1.0) if mb > 0 else None,
        "sign_test": st,
    }


def score_methods(
    predictions: dict[str, Sequence[str]],
    golds: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    references: Sequence[str] = REFERENCES,
) -> dict[str, dict[str, Any]]:
    """Scores of every method on the same users (predictions already post-processed).

    Per method: ``rouge1``, ``rougeL`` (means), ``rouge1_ci95``, ``rougeL_ci95`` (percentile bootstrap
    over users), ``per_user`` lists, and for each reference method present (and ``copy``)
    ``vs_<ref>``: ``{metric: paired_comparison}``. A method is not compared with itself.
    """
    per = {m: metrics.rouge_per_item(list(p), list(golds)) for m, p in predictions.items()}
    out: dict[str, dict[str, Any]] = {}
    for m, scores in per.items():
        entry: dict[str, Any] = {"n": len(golds)}
        for metric in METRICS:
            c = _ci(scores[metric], n_resamples, seed)
            entry[metric] = c["mean"]
            entry[f"{metric}_ci95"] = c["ci95"]
        for ref in (*references, "copy"):
            if ref in per and ref != m:
                entry[f"vs_{ref}"] = {
                    metric: paired_comparison(scores[metric], per[ref][metric], n_resamples, seed)
                    for metric in METRICS
                }
        entry["per_user"] = scores
        out[m] = entry
    return out


def goal_verdict(
    methods: dict[str, dict[str, Any]], method: str = "chameleon_group", target_rel: float = GOAL_REL_ROUGE_L
) -> dict[str, Any]:
    """Whether ``method`` meets the goal: ROUGE-L >= (1 + target_rel) × base, and above RAG, both with
    a paired test (95 % bootstrap interval of the difference above 0)."""
    m = methods.get(method)
    if m is None or "vs_base" not in m:
        return {"method": method, "evaluated": False}
    vb = m["vs_base"]["rougeL"]
    vr = m.get("vs_rag", {}).get("rougeL")
    beats_base = vb["rel"] is not None and vb["rel"] >= target_rel and vb["diff_ci95"][0] > 0
    beats_rag = vr is not None and vr["diff"] > 0 and vr["diff_ci95"][0] > 0
    return {
        "method": method,
        "evaluated": True,
        "metric": "rougeL",
        "target_rel_vs_base": target_rel,
        "rel_vs_base": vb["rel"],
        "diff_vs_base_ci95": vb["diff_ci95"],
        "p_vs_base": vb["p_bootstrap"],
        "diff_vs_rag": None if vr is None else vr["diff"],
        "diff_vs_rag_ci95": None if vr is None else vr["diff_ci95"],
        "p_vs_rag": None if vr is None else vr["p_bootstrap"],
        "beats_base_by_target": bool(beats_base),
        "beats_rag": bool(beats_rag),
        "met": bool(beats_base and beats_rag),
    }


def strip_per_user(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The scores without their ``per_user`` lists (what results files carry)."""
    return {m: {k: v for k, v in e.items() if k != "per_user"} for m, e in methods.items()}
