"""The official LaMP metrics, offline, plus bootstrap intervals and answer post-processing.

Reimplements ``LaMP/eval/evaluation.py`` of the LaMP benchmark without ``evaluate.load`` or sklearn:

- classification (LaMP-1, LaMP-2): predictions and golds are stripped and exact-string matched
  to the label list; an unmatched prediction maps to -1 (always wrong). Accuracy, and macro-F1
  over *all* labels with sklearn's ``f1_score(average="macro", labels=range(L), zero_division=0)``
  semantics: a label absent from both golds and predictions contributes F1 = 0 to the average.
- rating (LaMP-3): MAE and RMSE; a prediction that does not parse as a number maps to whichever
  of 1 or 5 is farther from the gold (5 when the gold is 3, as in LaMP's ``abs(1-y) > abs(5-y)``).
- generation (LaMP-4..7): ROUGE-1 and ROUGE-L F-measure from ``rouge_score`` (no stemming,
  default tokenizer), plain mean over items.

This module does not import Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = [
    "ConfidenceInterval",
    "PairedBootstrap",
    "accuracy_f1",
    "bootstrap_ci",
    "first_answer_line",
    "mae_rmse",
    "paired_bootstrap",
    "paired_sign_test",
    "rouge",
    "rouge_per_item",
]


def _check_lengths(preds: Sequence, golds: Sequence) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} golds")
    if len(golds) == 0:
        raise ValueError("no items to score")


# --------------------------------------------------------------------------- classification


def accuracy_f1(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """LaMP-1/2 accuracy and macro-F1 over all ``labels``: ``{"accuracy", "f1"}``.

    Predictions and golds are stripped, then exact-string matched to ``labels``; an unmatched
    prediction counts as wrong. A gold outside ``labels`` is a data error and raises ``ValueError``.
    """
    _check_lengths(preds, golds)
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    p = np.array([index.get(str(x).strip(), -1) for x in preds])
    g_list = []
    for x in golds:
        gi = index.get(str(x).strip(), -1)
        if gi < 0:
            raise ValueError(f"gold {x!r} is not one of the labels")
        g_list.append(gi)
    g = np.array(g_list)
    accuracy = float(np.mean(p == g))
    f1s = []
    for k in range(len(labels)):
        tp = int(np.sum((p == k) & (g == k)))
        fp = int(np.sum((p == k) & (g != k)))
        fn = int(np.sum((p != k) & (g == k)))
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": accuracy, "f1": float(np.mean(f1s)) if f1s else 0.0}


# --------------------------------------------------------------------------- rating


def _as_rating(x: str) -> float | None:
    try:
        v = float(str(x).strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def mae_rmse(preds: Sequence[str | float], golds: Sequence[str | float]) -> dict[str, float]:
    """LaMP-3 MAE and RMSE: ``{"mae", "rmse"}``.

    A prediction that does not parse as a finite number maps to whichever of 1 and 5 is farther
    from the gold (LaMP's worst-case rule; 5 for a gold of 3). Parsed predictions are not clipped.
    """
    _check_lengths(preds, golds)
    p, g = [], []
    for x, y in zip(preds, golds, strict=True):
        gy = _as_rating(y)
        if gy is None:
            raise ValueError(f"gold rating {y!r} is not a number")
        px = _as_rating(x)
        if px is None:
            px = 1.0 if abs(1 - gy) > abs(5 - gy) else 5.0
        p.append(px)
        g.append(gy)
    err = np.array(p) - np.array(g)
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2)))}


# --------------------------------------------------------------------------- generation


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

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


def rouge(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure over items: ``{"rouge1", "rougeL"}`` (LaMP-4..7)."""
    per = rouge_per_item(preds, golds)
    return {k: float(np.mean(v)) for k, v in per.items()}


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


def first_answer_line(text: str) -> str:
    """The answer line of a generated reply, as scored in ``reference/lamp7-baselines.md``.

    Takes the first non-empty line (stripped). If that line ends with ``':'`` (a preamble such as
    "Here's a rewritten version of the tweet:") and another non-empty line follows, the next
    non-empty line is taken instead. Only one preamble line is skipped. Empty input gives ``""``.
    """
    lines = [ln.strip() for ln in str(text).splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return ""
    if lines[0].endswith(":") and len(lines) > 1:
        return lines[1]
    return lines[0]
