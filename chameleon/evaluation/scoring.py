"""Scores of every method on the same users: ROUGE-1/L, bootstrap intervals, paired tests, the goal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from chameleon.core import style
from chameleon.core.generation import first_answer_line
from chameleon.evaluation import metrics
from chameleon.evaluation.names import GOAL_REL_ROUGE_L, REFERENCES

__all__ = ["goal_verdict", "goals", "paired_comparison", "postprocess", "score_methods", "strip_per_user"]

METRICS = ("rouge1", "rougeL")
DIAGNOSTICS = ("style_feature_distance", "assistant_talk", "rougeL_vs_input", "length_ratio")


def postprocess(raw: Sequence[str]) -> list[str]:
    """The scored answers of raw generations (:func:`core.generation.first_answer_line` of each)."""
    return [first_answer_line(x) for x in raw]


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


def style_per_user(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    inputs: Sequence[str],
    golds: Sequence[str],
) -> dict[str, list[float]]:
    """Per user: style similarity to the user's reference items (see `evaluation.style`), whether
    the answer talks like an assistant, ROUGE-L of the answer against the task's input text
    (closeness to the input), and the answer's length over the gold's (in words)."""
    closeness = metrics.rouge_per_item(list(predictions), list(inputs))["rougeL"]
    return {
        "style": [style.style_similarity(p, r) for p, r in zip(predictions, references, strict=True)],
        "style_feature_distance": [
            style.feature_distance(p, r) for p, r in zip(predictions, references, strict=True)
        ],
        "assistant_talk": [float(style.assistant_talk(p)) for p in predictions],
        "rougeL_vs_input": closeness,
        "length_ratio": [
            len(p.split()) / max(1, len(g.split())) for p, g in zip(predictions, golds, strict=True)
        ],
    }


def score_methods(
    predictions: dict[str, Sequence[str]],
    golds: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    references: Sequence[str] = REFERENCES,
    style_references: Sequence[Sequence[str]] | None = None,
    inputs: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores of every method on the same users (predictions already post-processed).

    Per method: ``rouge1``, ``rougeL`` (means), ``rouge1_ci95``, ``rougeL_ci95`` (percentile bootstrap
    over users), ``per_user`` lists, and for each reference method present (and ``copy``)
    ``vs_<ref>``: ``{metric: paired_comparison}``. A method is not compared with itself. With
    ``style_references`` (per user, history items no edit was made from) and ``inputs`` (the task
    input texts), also ``style`` (mean, interval, paired comparison with each reference) and the
    diagnostics ``assistant_talk`` (share), ``rougeL_vs_input`` and ``length_ratio`` (means).
    """
    per = {m: metrics.rouge_per_item(list(p), list(golds)) for m, p in predictions.items()}
    if style_references is not None and inputs is not None:
        for m, p in predictions.items():
            per[m].update(style_per_user(p, style_references, inputs, golds))
    out: dict[str, dict[str, Any]] = {}
    for m, scores in per.items():
        entry: dict[str, Any] = {"n": len(golds)}
        for metric in METRICS:
            c = _ci(scores[metric], n_resamples, seed)
            entry[metric] = c["mean"]
            entry[f"{metric}_ci95"] = c["ci95"]
        compared = [*METRICS, "style"] if "style" in scores else list(METRICS)
        if "style" in scores:
            c = _ci(scores["style"], n_resamples, seed)
            entry["style"], entry["style_ci95"] = c["mean"], c["ci95"]
            for diag in DIAGNOSTICS:
                entry[diag] = float(np.mean(scores[diag]))
        for ref in (*references, "copy"):
            if ref in per and ref != m:
                entry[f"vs_{ref}"] = {
                    metric: paired_comparison(scores[metric], per[ref][metric], n_resamples, seed)
                    for metric in compared
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


ISSUE_GOALS = (
    # (name, method, reference, metric, relative target, kind)
    ("group_rougeL_vs_base", "chameleon_group", "base", "rougeL", 0.15, "at_least"),
    ("group_rougeL_vs_rag", "chameleon_group", "rag", "rougeL", 0.40, "at_least"),
    ("unseen_rougeL_vs_base", "chameleon_unseen", "base", "rougeL", 0.10, "at_least"),
    ("random_direction_within_5pct_of_base", "random_direction", "base", "rougeL", 0.05, "within"),
    ("group_style_above_base", "chameleon_group", "base", "style", 0.0, "above"),
)


def goals(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every goal of the personalization protocol, judged from the paired comparisons: `at_least`
    = relative difference >= target with the 95 % interval of the difference above 0; `within` =
    |relative difference| <= target; `above` = the interval of the difference above 0."""
    out: dict[str, dict[str, Any]] = {}
    for name, method, ref, metric, target, kind in ISSUE_GOALS:
        cmp = methods.get(method, {}).get(f"vs_{ref}", {}).get(metric)
        if cmp is None:
            out[name] = {"evaluated": False}
            continue
        rel, low = cmp["rel"], cmp["diff_ci95"][0]
        if kind == "at_least":
            met = rel is not None and rel >= target and low > 0
        elif kind == "within":
            met = rel is not None and abs(rel) <= target
        else:
            met = low > 0
        out[name] = {
            "evaluated": True,
            "method": method,
            "reference": ref,
            "metric": metric,
            "target": target,
            "kind": kind,
            "rel": rel,
            "diff": cmp["diff"],
            "diff_ci95": cmp["diff_ci95"],
            "p": cmp["p_bootstrap"],
            "met": bool(met),
        }
    return out


def strip_per_user(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The scores without their ``per_user`` lists (what results files carry)."""
    return {m: {k: v for k, v in e.items() if k != "per_user"} for m, e in methods.items()}
