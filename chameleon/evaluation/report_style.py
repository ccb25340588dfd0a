"""The report's personalization section: format vs personalization for every method, style
attribution, marker transfer beside the model's style capacity, and issue 18's goals.

Reads ``results.json``'s ``personalization`` and ``style_goals`` (written by
``evaluation.personalization``) and, when the output directory has one, ``style_capacity.json``
(written by ``jobs/bench/style_capacity.py --out``), so a reader sees whether a missed marker goal
is the method's or the model's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chameleon.core.markers import MARKERS

__all__ = ["CAPACITY_FILE", "gain_label", "personalization_section"]

CAPACITY_FILE = "style_capacity.json"


def _head(*columns: str) -> list[str]:
    """A markdown table's header row and separator."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _ci(ci: Sequence[float], fmt: str = "+.3f") -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _cmp(c: dict[str, Any] | None, fmt: str = "+.3f") -> str:
    return "" if not c else f"{c['diff']:{fmt}} {_ci(c['diff_ci95'], fmt)}"


def gain_label(rouge_vs_base: dict[str, Any] | None, adjusted: dict[str, Any] | None) -> str:
    """``personalization`` when the ROUGE-L gain over base is significant and its closeness-adjusted
    intercept's interval is above 0; ``format`` when only the gain is; ``no gain`` otherwise."""
    if not rouge_vs_base or rouge_vs_base["diff_ci95"][0] <= 0:
        return "no gain"
    return "personalization" if adjusted and adjusted["above_zero"] else "format"


def _method_table(res: dict[str, Any], order: Sequence[str]) -> list[str]:
    P = res["personalization"]
    A, C = P["attribution"], P["closeness_adjusted"]
    L = [
        f"Style attribution: rank of the user's own unused history among {A['n_candidates']} candidates "
        f"(the user and others of the reported users, one seeded draw for every method) by the character "
        f"n-gram style similarity of the answer; chance: MRR {A['chance_mrr']:.3f}, top-1 "
        f"{A['chance_top1'] * 100:.0f} %. Closeness-adjusted gain: intercept of per-user ΔROUGE-L on "
        "Δcloseness to the input (the gain without moving closer to the input), bootstrap 95 % CI. A "
        "ROUGE-L gain over base is called **format** unless that intercept's CI is above 0.\n",
        *_head(
            "method", "ROUGE-L vs base", "adjusted gain vs base", "reading", "adjusted gain vs global",
            "attribution MRR [CI]", "top-1", "MRR vs base", "MRR vs global",
        ),
    ]  # fmt: skip
    for m in order:
        a = A["methods"].get(m)
        if a is None:
            continue
        c = C.get(m, {})
        rb = res["methods"].get(m, {}).get("vs_base", {}).get("rougeL")
        adj = {
            k: "" if k not in c else f"{c[k]['intercept']:+.4f} {_ci(c[k]['intercept_ci95'], '+.4f')}"
            for k in ("vs_base", "vs_chameleon_global")
        }
        label = "" if m == "base" else gain_label(rb, c.get("vs_base"))
        L.append(
            f"| `{m}` | {_cmp(rb)} | {adj['vs_base']} | {label} | {adj['vs_chameleon_global']} | "
            f"{a['mrr']:.3f} {_ci(a['mrr_ci95'], '.3f')} | {a['top1'] * 100:.0f} % | "
            f"{_cmp(a.get('vs_base', {}).get('mrr'))} | {_cmp(a.get('vs_chameleon_global', {}).get('mrr'))} |"
        )
    L.append("")
    return L


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.0f} %"


def _marker_tables(res: dict[str, Any], order: Sequence[str], capacity: dict[str, Any] | None) -> list[str]:
    K = res["personalization"]["markers"]
    marks = [mk for mk in MARKERS if mk in K]
    if not marks:
        return []
    L = [
        "Marker transfer: share of answers carrying a marker, for the users whose unused history shows it "
        "/ for the users whose history does not (thresholds: "
        + ", ".join(f"{mk} ≥ {K[mk]['threshold'] * 100:.0f} % of items" for mk in marks)
        + "; column heads: users with / without).\n",
        *_head("method", *(f"{mk} ({K[mk]['n_with']}/{K[mk]['n_without']})" for mk in marks)),
    ]
    for m in order:
        if m not in K[marks[0]]["methods"]:
            continue
        cells = []
        for mk in marks:
            e = K[mk]["methods"][m]
            cells.append(
                f"{_pct(e['with'] and e['with']['share'])} / {_pct(e['without'] and e['without']['share'])}"
            )
        L.append(f"| `{m}` | " + " | ".join(cells) + " |")
    L.append("")
    for ref in res["personalization"]["references"]:
        L += [
            f"Marker share vs `{ref}` (paired difference [95 % CI]; users with the marker / without):\n",
            *_head("method", *marks),
        ]
        for m in order:
            if m == ref or m not in K[marks[0]]["methods"]:
                continue
            cells = []
            for mk in marks:
                e = K[mk]["methods"][m]
                w = e["with"] and e["with"].get(f"vs_{ref}")
                wo = e["without"] and e["without"].get(f"vs_{ref}")
                cells.append(f"{_cmp(w, '+.2f') or '–'} / {_cmp(wo, '+.2f') or '–'}")
            L.append(f"| `{m}` | " + " | ".join(cells) + " |")
        L.append("")
    if capacity:
        L += _capacity_table(capacity, marks)
    else:
        L.append(
            f"Style capacity of the model: not measured beside this run (no `{CAPACITY_FILE}` in the "
            "output directory; `jobs/bench/style_capacity.py --out` writes one).\n"
        )
    return L


def _served_marker_table(res: dict[str, Any], order: Sequence[str]) -> list[str]:
    """Marker parts as the run served them: shares among the users each part reaches, paired."""
    S = res["personalization"].get("served_markers") or {}
    if not S:
        return []
    refs = res["personalization"]["references"]
    L = [
        "Marker parts as served: share of answers carrying the marker among the users whose served "
        "row adds its part (chosen by the run from their history without the reference items) / "
        "among the others; the share of the reached users' answers that carry it AND stay readable "
        "(three words besides the markers, `core.markers.readable`: a run of emoji is not a style); "
        "and the paired difference against "
        + " and ".join(f"`{r}`" for r in refs)
        + " for the users it reaches.\n",
        *_head("marker", "method", "reached / others", "readable", *(f"reached vs `{r}`" for r in refs)),
    ]
    for mk, e in S.items():
        for m in order:
            me = e["methods"].get(m)
            if me is None:
                continue
            w, wo = me["with"], me["without"]
            cmps = [(_cmp(w and w.get(f"vs_{r}"), "+.2f") or "–") for r in refs]
            shares = f"{_pct(w and w['share'])} / {_pct(wo and wo['share'])}"
            read = _pct(w and w.get("readable_share"))
            row = f"| {mk} ({e['n_with']}/{e['n_without']}) | `{m}` | {shares} | {read} | "
            L.append(row + " | ".join(cmps) + " |")
    L.append("")
    return L


def _capacity_table(capacity: dict[str, Any], marks: Sequence[str]) -> list[str]:
    cap = capacity["capacity"]
    users = capacity.get("users") or ["?", "?"]
    L = [
        f"**Style capacity of the model** ({capacity.get('model', '?')}, LaMP-7 tuning users "
        f"{users[0]}..{users[1] - 1 if isinstance(users[1], int) else users[1]}): share of answers carrying "
        "each marker under the same prompt when an instruction asks for it (appended to the system turn, "
        "or after the user's message); the capacity is the larger, the ceiling any personalization can "
        "reach on this model. The users' own golds beside it.\n",
        *_head("marker", "no instruction", "asked (system)", "asked (user)", "capacity", "the users' golds"),
    ]
    for mk in marks:
        e = cap["markers"].get(mk)
        if e is None:
            continue
        bp = e["by_placement"]
        L.append(
            f"| {mk} | {_pct(e['none'])} | {_pct(bp.get('system', {}).get('share'))} | "
            f"{_pct(bp.get('user', {}).get('share'))} | **{_pct(e['capacity'])}** | "
            f"{_pct(capacity.get('gold', {}).get(mk))} |"
        )
    L.append("")
    return L


def _goals_table(goals: dict[str, Any]) -> list[str]:
    L = ["### Goals of issue 18\n", *_head("goal", "what it asks", "figure", "met")]
    for name, g in goals.items():
        met = "not run" if not g["evaluated"] else ("**met**" if g["met"] else "**not met**")
        L.append(f"| {name} | {g['goal']} | {g['figure']} | {met} |")
    L.append("")
    return L


def personalization_section(res: dict[str, Any], out_dir: str | Path, order: Sequence[str]) -> list[str]:
    """The section's markdown lines (empty when ``res`` has no personalization figures)."""
    if "personalization" not in res:
        return []
    path = Path(out_dir) / CAPACITY_FILE
    capacity = json.loads(path.read_text()) if path.is_file() else None
    L = ["## Personalization, not format\n"]
    L += _method_table(res, order)
    L += _marker_tables(res, order, capacity)
    L += _served_marker_table(res, order)
    if res.get("style_goals"):
        L += _goals_table(res["style_goals"])
    L.append(
        "Every figure of this section is recomputed from `results.json`'s `per_user` block alone by "
        "`python -m chameleon.evaluation.recompute results.json`.\n"
    )
    return L
