"""Recompute an evaluation's headline figures from its ``results.json`` alone (no LaMP text, no model).

    python -m chameleon.evaluation.recompute docs/results/<run>/results.json

Reads the ``per_user`` block (user ids, history marker shares, and per method the per-user ROUGE-L,
closeness to the input, attribution rank and marker flags), recomputes from it the mean ROUGE-L of
every method, the personalization figures (attribution MRR / top-1, marker transfer, closeness-
adjusted gain, each against base and the global edit) and issue 18's goal rows, prints the headline
figures as ``name=value`` lines, and compares them with what the file states: exit status 1 (and
the differing figures on stderr) when any differs by more than 1e-9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from chameleon.evaluation.personalization import figures_from_per_user

__all__ = ["compare", "headline", "recompute", "main"]


def recompute(results: dict[str, Any]) -> dict[str, Any]:
    """``{"personalization", "style_goals", "rougeL"}`` recomputed from ``results["per_user"]``
    with the run's own bootstrap settings."""
    if "per_user" not in results:
        raise ValueError("results.json has no per_user block (written by evaluations since issue 18)")
    boot = results.get("scoring", {}).get("bootstrap", {})
    per_user = results["per_user"]
    out = figures_from_per_user(per_user, n_resamples=boot.get("n_resamples", 1000), seed=boot.get("seed", 0))
    out["rougeL"] = {m: float(np.mean(e["rougeL"])) for m, e in per_user["methods"].items()}
    return out


def headline(figures: dict[str, Any]) -> dict[str, float | str]:
    """The report's headline figures from :func:`recompute`'s output, as flat ``name: value``."""
    pers = figures["personalization"]
    out: dict[str, float | str] = {}
    for m, v in figures["rougeL"].items():
        out[f"{m}.rougeL"] = v
    for m, e in pers["attribution"]["methods"].items():
        out[f"{m}.attribution_mrr"] = e["mrr"]
        out[f"{m}.attribution_top1"] = e["top1"]
    for m, e in pers["closeness_adjusted"].items():
        if "vs_base" in e:
            out[f"{m}.closeness_adjusted_gain_vs_base"] = e["vs_base"]["intercept"]
    for mk, e in pers["markers"].items():
        for m, me in e["methods"].items():
            for side in ("with", "without"):
                if me[side] is not None:
                    out[f"{m}.{mk}_share_{side}"] = me[side]["share"]
    for mk, e in pers.get("served_markers", {}).items():
        for m, me in e["methods"].items():
            for side, name in (("with", "reached"), ("without", "not_reached")):
                if me[side] is not None:
                    out[f"{m}.{mk}_share_{name}"] = me[side]["share"]
    for g, row in figures["style_goals"].items():
        out[f"goal.{g}"] = "not run" if not row["evaluated"] else ("met" if row["met"] else "not met")
    return out


def compare(results: dict[str, Any], tol: float = 1e-9) -> list[str]:
    """Figures of ``results`` that differ from their recomputation (empty: everything agrees)."""
    figs = recompute(results)
    stated = {
        "personalization": results.get("personalization"),
        "style_goals": results.get("style_goals"),
        "rougeL": {
            m: results["methods"][m]["rougeL"] for m in figs["rougeL"] if m in results.get("methods", {})
        },
    }
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                if k not in a or k not in b:
                    diffs.append(f"{path}.{k}: only in {'the file' if k in b else 'the recomputation'}")
                else:
                    walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
            if abs(float(a) - float(b)) > tol:
                diffs.append(f"{path}: recomputed {a!r}, file says {b!r}")
        elif a != b:
            diffs.append(f"{path}: recomputed {a!r}, file says {b!r}")

    for key in stated:
        walk(figs[key], stated[key], key)
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="path of a results.json with a per_user block")
    args = p.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    for name, value in headline(recompute(results)).items():
        print(f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}")
    diffs = compare(results)
    for d in diffs:
        print(d, file=sys.stderr)
    print(f"figures_differing={len(diffs)}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
