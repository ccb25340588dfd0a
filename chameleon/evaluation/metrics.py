"""The official LaMP-7 metrics, offline, plus bootstrap intervals and answer post-processing.

ROUGE-1 and ROUGE-L F-measure as ``LaMP/eval/evaluation.py`` of the LaMP benchmark computes them for
its generation tasks, without ``evaluate.load``: ``rouge_score`` with no stemming and its default
tokenizer, per item (the mean over items is the task's score).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from rouge_score import rouge_scorer

__all__ = [
    "ConfidenceInterval",
    "PairedBootstrap",
    "bootstrap_ci",
    "paired_bootstrap",
    "paired_sign_test",
    "rouge_per_item",
]


def _check_lengths(preds: Sequence, golds: Sequence) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} golds")
    if len(golds) == 0:
        raise ValueError("no items to score")


# --------------------------------------------------------------------------- ROUGE


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge_per_item(preds: Sequence[str], golds: Sequence[str]) -> dict[str, list[float]]:
    """Per-item ROUGE-1 and ROUGE-L F-measure: ``{"rouge1": [...], "rougeL": [...]}``, in input order.

    Both sides are stripped (as LaMP's evaluator does); an empty prediction scores 0.
    """
    _check_lengths(preds, golds)
    scorer = _scorer()
    r1, rl = [], []
    for pred, gold in zip(preds, golds, strict=True):
        s = scorer.score(str(gold).strip(), str(pred).strip())  # score(target, prediction)
        r1.append(float(s["rouge1"].fmeasure))
        rl.append(float(s["rougeL"].fmeasure))
    return {"rouge1": r1, "rougeL": rl}


# --------------------------------------------------------------------------- uncertainty


class ConfidenceInterval(NamedTuple):
    """A mean and its percentile-bootstrap interval."""

    mean: float
    low: float
    high: float


class PairedBootstrap(NamedTuple):
    """Mean of ``a - b``, its percentile-bootstrap interval, and a two-sided bootstrap p-value."""

    mean_diff: float
    low: float
    high: float
    p_value: float


def _as_1d(values: Sequence[float] | np.ndarray, what: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite entries")
    return arr


def _bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = x.size
    means = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // n)  # bound memory: at most ~4M indices at a time
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    return means


def _percentiles(means: np.ndarray, ci: float) -> tuple[float, float]:
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    alpha = (1 - ci) / 2
    low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 1000, ci: float = 0.95, seed: int = 0
) -> ConfidenceInterval:
    """Percentile bootstrap interval of the mean of ``values`` (deterministic for a given ``seed``)."""
    x = _as_1d(values)
    low, high = _percentiles(_bootstrap_means(x, n_resamples, seed), ci)
    return ConfidenceInterval(mean=float(x.mean()), low=low, high=high)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> PairedBootstrap:
    """Paired bootstrap of ``mean(a - b)`` over items (users resampled together for both systems).

    The p-value is two-sided: the fraction of resampled mean differences on the other side of 0
    from the observed one (0 included), doubled and clamped to 1. A p-value of 0 means "below
    1/n_resamples". An observed difference of exactly 0 gives 1.
    """
    xa, xb = _as_1d(a, "a"), _as_1d(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"paired samples differ in length: {xa.size} vs {xb.size}")
    d = xa - xb
    means = _bootstrap_means(d, n_resamples, seed)
    low, high = _percentiles(means, ci)
    m = float(d.mean())
    if m > 0:
        frac = float(np.mean(means <= 0))
    elif m < 0:
        frac = float(np.mean(means >= 0))
    else:
        frac = 0.5
    return PairedBootstrap(mean_diff=m, low=low, high=high, p_value=min(1.0, 2 * frac))


def paired_sign_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Exact two-sided sign test on paired items: ``{"n_pos", "n_neg", "n_ties", "p_value"}``.

    Ties (``a == b``) are dropped; p = min(1, 2 * P[Binomial(n, 1/2) <= min(n_pos, n_neg)]).
    """
    xa, xb = _as_1d(a, "a"), _as_1d(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"paired samples differ in length: {xa.size} vs {xb.size}")
    d = xa - xb
    n_pos, n_neg = int(np.sum(d > 0)), int(np.sum(d < 0))
    n = n_pos + n_neg
    if n == 0:
        p = 1.0
    else:
        k = min(n_pos, n_neg)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        p = min(1.0, 2 * tail)
    return {"n_pos": n_pos, "n_neg": n_neg, "n_ties": int(d.size - n), "p_value": float(p)}


# --------------------------------------------------------------------------- post-processing
