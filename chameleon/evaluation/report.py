"""The report of an evaluation: ``report.md`` and PNG plots, from the files in its output directory.

Needs nothing but ``results.json`` (and ``ablations.json`` / a hand-written ``discussion.md`` when
present), so a report can be redrawn without rerunning anything (``chameleon eval --report-only``).
matplotlib is imported when a plot is drawn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chameleon.evaluation.names import GOAL_REL_ROUGE_L, METHODS
from chameleon.evaluation.report_style import personalization_section

__all__ = ["write_report"]


_LABELS = {
    "copy": "copy (input tweet, no model)",
    "base": "base (instruct model)",
    "rag": "RAG (BM25 top-k in prompt)",
    "chameleon_user": "Chameleon, user edit",
    "chameleon_group": "Chameleon, group edit",
    "chameleon_unseen": "Chameleon, unseen users",
}


def _label(m: str) -> str:
    if m.endswith("_default") and m[: -len("_default")] in _LABELS:
        return _LABELS[m[: -len("_default")]] + " (default setting)"
    return _LABELS.get(m, m)


def _display_order(methods: Sequence[str]) -> list[str]:
    """Report order: the issue's methods, each Chameleon method followed by its `_default` twin."""
    out = []
    for m in METHODS:
        if m in methods:
            out.append(m)
        if f"{m}_default" in methods:
            out.append(f"{m}_default")
    return out + [m for m in methods if m not in out]


def _pct(rel: float | None) -> str:
    return "n/a (base scores 0)" if rel is None else f"{rel * 100:+.1f} %"


def _fmt_ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt_cmp(c: dict[str, Any] | None, signed: bool = True) -> str:
    if not c:
        return ""
    rel = "" if c.get("rel") is None else f" ({c['rel'] * 100:+.1f} %)"
    return f"{c['diff']:+.3f} {_fmt_ci(c['diff_ci95'])}{rel}, p={c['p_bootstrap']:.3f}"


def _pyplot():
    """matplotlib's pyplot on the file-only backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_methods(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()

    methods = _display_order(list(results["methods"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, metric in zip(axes, ("rouge1", "rougeL"), strict=True):
        means = [results["methods"][m][metric] for m in methods]
        cis = [results["methods"][m][f"{metric}_ci95"] for m in methods]
        err = np.array(
            [
                [mu - c[0] for mu, c in zip(means, cis, strict=True)],
                [c[1] - mu for mu, c in zip(means, cis, strict=True)],
            ]
        )
        colors = [
            "#999999" if m == "copy" else "#4c72b0" if m in ("base", "rag") else "#dd8452" for m in methods
        ]
        ax.bar(range(len(methods)), means, yerr=err, capsize=3, color=colors)
        if "copy" in results["methods"]:
            ax.axhline(
                results["methods"]["copy"][metric], color="#555555", ls="--", lw=1, label="copy (sanity line)"
            )
        if "base" in results["methods"]:
            ax.axhline(
                results["methods"]["base"][metric] * (1 + GOAL_REL_ROUGE_L),
                color="#c44e52",
                ls=":",
                lw=1,
                label=f"base +{GOAL_REL_ROUGE_L * 100:.0f} % (goal)",
            )
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("mean over users (95 % bootstrap CI)")
    fig.suptitle(f"LaMP-7, {results['n_users']} reported users, {results['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_xy(
    series: dict[str, list[tuple[float, float, float, float]]],
    refs: dict[str, float],
    xlabel: str,
    title: str,
    path: Path,
    logx: bool = False,
    xticks: list[tuple[float, str]] | None = None,
) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        lo = [p[1] - p[2] for p in pts]
        hi = [p[3] - p[1] for p in pts]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=name)
    styles = {"copy": ("#555555", "--"), "base": ("#4c72b0", ":"), "rag": ("#55a868", "-.")}
    for name, val in refs.items():
        c, ls = styles.get(name, ("#999999", ":"))
        ax.axhline(val, color=c, ls=ls, lw=1, label=name)
    if logx:
        ax.set_xscale("log")
    if xticks:
        ax.set_xticks([t[0] for t in xticks], [t[1] for t in xticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ROUGE-L (95 % CI)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pt(p: dict[str, Any], x: float) -> tuple[float, float, float, float]:
    return (x, p["rougeL"], p["rougeL_ci95"][0], p["rougeL_ci95"][1])


def _ablation_plots(ab: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """PNG plots of the ablations: (file, caption) of each plot drawn."""
    drawn = []
    refs = {m: ab["reference"][m]["rougeL"] for m in ab["reference"]}
    pts = ab["points"]
    default_g = next((p for p in pts if p["ablation"] == "default" and p["level"] == "group"), None)
    default_u = next((p for p in pts if p["ablation"] == "default" and p["level"] == "user"), None)
    n = ab["users"]["n_scored"]
    size_pts = [p for p in pts if p["ablation"] == "group_size"]
    if size_pts:
        series = [_pt(p, p["mean_group_size"]) for p in size_pts]
        if default_g:
            series.append(_pt(default_g, default_g["mean_group_size"]))
        if default_u:
            series.append(_pt(default_u, 1.0))
        _plot_xy(
            {"Chameleon (group edit; 1 = own edit)": series},
            refs,
            "users pooled per group (mean group size)",
            f"ROUGE-L vs group size ({n} tuning users)",
            out / "metric_vs_group_size.png",
            logx=True,
        )
        drawn.append(
            ("metric_vs_group_size.png", "ROUGE-L vs number of users pooled per group (tuning users).")
        )
    alpha_pts = [p for p in pts if p["ablation"] == "alpha"]
    if alpha_pts:
        series = [_pt(p, float(p["value"])) for p in alpha_pts]
        if default_g:
            series.append(_pt(default_g, float(default_g["alpha"])))
        _plot_xy(
            {"Chameleon group edit (β = 1)": series},
            refs,
            "α (scale of the added personalized component)",
            f"ROUGE-L vs α ({n} tuning users)",
            out / "metric_vs_alpha.png",
        )
        drawn.append(("metric_vs_alpha.png", "ROUGE-L vs edit strength α (tuning users)."))
    hist = ab.get("history")
    if hist:
        xs = {1: 1, 3: 3, 5: 5, "all": 8}
        series: dict[str, list] = {}
        for p in hist["points"]:
            series.setdefault(f"Chameleon, {p['level']} edit", []).append(_pt(p, xs[p["history_k"]]))
        href = {m: hist["reference"][m]["rougeL"] for m in hist["reference"]}
        _plot_xy(
            series,
            href,
            "history items per user (k)",
            f"ROUGE-L vs history size ({hist['n_users']} tuning users)",
            out / "metric_vs_history_size.png",
            xticks=[(1, "1"), (3, "3"), (5, "5"), (8, "all")],
        )
        drawn.append(
            ("metric_vs_history_size.png", "ROUGE-L vs number of history items per user (tuning users).")
        )
    return drawn


def write_report(out_dir: str | Path) -> Path:
    """``report.md`` (+ PNG plots) from ``results.json`` and, when present, ``ablations.json`` and a
    hand-written ``discussion.md`` in ``out_dir``. Needs nothing but those files."""
    out = Path(out_dir)
    res = json.loads((out / "results.json").read_text())
    ab = json.loads((out / "ablations.json").read_text()) if (out / "ablations.json").is_file() else None
    _plot_methods(res, out / "metric_by_method.png")
    M = res["methods"]
    L: list[str] = []
    L.append(f"# LaMP-7 evaluation: {res['model']}\n")
    u = res["users"]
    scored = f"file positions {u['reported_positions'][0]}..{u['reported_positions'][1] - 1}"
    tuning = f"Tuning users: positions {u['tuning_positions'][0]}..{u['tuning_positions'][1] - 1}.\n"
    L.append(
        # A validation run scores held-out tuning users: decisions may be taken on it, so it must
        # never read as a report on never-used users.
        f"**Validation run**: scored users **{res['n_users']}** ({scored}) are held-out *tuning* users, "
        f"not reported ones. {tuning}"
        if res.get("phase", "reported") != "reported"
        else f"Reported users: **{res['n_users']}** ({scored}, never used for tuning). {tuning}"
    )
    g = res.get("goal", {})
    if g.get("evaluated"):
        verdict = "**met**" if g["met"] else "**not met**"
        L.append(
            f"**Goal** (Chameleon group edit ≥ base + {g['target_rel_vs_base'] * 100:.0f} % relative ROUGE-L and above RAG, paired test): {verdict}. "
            f"Group edit vs base: {_pct(g['rel_vs_base'])} ROUGE-L (difference 95 % CI {_fmt_ci(g['diff_vs_base_ci95'])}, "
            f"p = {g['p_vs_base']:.3f}); vs RAG: {g['diff_vs_rag']:+.3f} (95 % CI {_fmt_ci(g['diff_vs_rag_ci95'])}, p = {g['p_vs_rag']:.3f}).\n"
            if g.get("diff_vs_rag") is not None
            else f"**Goal**: {verdict} (group edit vs base {_pct(g['rel_vs_base'])} ROUGE-L; RAG not evaluated).\n"
        )
    L.append("## Results on reported users\n")
    L.append(
        "| method | ROUGE-1 [95 % CI] | ROUGE-L [95 % CI] | ROUGE-L vs base (diff [CI], rel, p) | ROUGE-L vs RAG | gap to copy (ROUGE-L) |"
    )
    L.append("|---|---|---|---|---|---|")
    for m in _display_order(list(M)):
        e = M[m]
        name = _label(m)
        vb = _fmt_cmp(e.get("vs_base", {}).get("rougeL"))
        vr = _fmt_cmp(e.get("vs_rag", {}).get("rougeL"))
        gap = e.get("vs_copy", {}).get("rougeL")
        gap_s = "" if not gap else f"{gap['diff']:+.3f} {_fmt_ci(gap['diff_ci95'])}"
        L.append(
            f"| `{m}` {name} | {e['rouge1']:.3f} {_fmt_ci(e['rouge1_ci95'])} | {e['rougeL']:.3f} {_fmt_ci(e['rougeL_ci95'])} | {vb} | {vr} | {gap_s} |"
        )
    L.append("")
    L.append(
        f"Paired comparisons resample users jointly for both methods ({res['scoring']['bootstrap']['n_resamples']:,} bootstrap "
        "resamples); p is the two-sided "
        "bootstrap p-value of that one comparison, not corrected for the number of comparisons in the table. "
        "ROUGE-1 comparisons and exact sign tests are in `results.json`. `copy` answers with "
        "the tweet inside the LaMP input and uses no model: on this task it is the sanity line every method should "
        "be read against (the gap column: negative = below copy).\n"
    )
    L.append("![metric by method](metric_by_method.png)\n")
    L.extend(_style_section(M))
    L.extend(personalization_section(res, out, _display_order(list(M))))
    L.extend(_two_by_two(M))
    L.extend(_goals_section(res.get("goals")))
    cfg = res["config"]
    L.append("## Setup\n")
    gen = res["generation"]
    L.append(
        f"- Decoding: {gen['decoding']}, max {gen['max_new_tokens']} new tokens, batch {gen['batch_size']}, {gen['prompt']}; "
        f"answer = first non-empty line (a preamble line ending in ':' skipped). RAG k = {gen['rag_k']}."
    )
    L.append(f"- Scoring: {res['scoring']['metric']}; 95 % percentile bootstrap over users.")
    fin = cfg["final"]
    L.append(f"- Chameleon synthesis: {fin['synth']}.")
    groups_s = (
        f"one group per about {cfg['final_group_size']} users (group count scaled to each run)"
        if cfg.get("final_group_size") not in (None, "all")
        else "all users in one group"
        if cfg.get("final_group_size") == "all"
        else str(fin["groups"])
    )
    L.append(
        f"- Chameleon reduce/edit used for `chameleon_*`: subspace {fin['subspace']}, groups: {groups_s}, edit {fin['edit']}."
    )
    if cfg.get("selected_on_tuning"):
        sel = cfg["selected"] or {}
        L.append(
            f"- That reduce/edit setting was **selected on tuning users** (ablations below): `{sel.get('label')}`, overrides "
            f"{sel.get('overrides')}, users per group {sel.get('group_size')}. "
            "Methods suffixed `_default` use the default setting "
            + f"({cfg['default']['subspace']}, {cfg['default']['edit']})."
        )
    runs = res.get("runs", {})
    for key in ("groups_all", "groups_tuning"):
        if key in runs:
            sizes = sorted(runs[key].values(), reverse=True)
            what = "tuning + reported users" if key == "groups_all" else "tuning users only (unseen setting)"
            L.append(f"- Groups from {what}: {len(sizes)} groups, sizes {sizes}.")
    if "marker_parts" in runs:
        mp = runs["marker_parts"]
        reached = ", ".join(f"{m} {n}" for m, n in mp["reported_users"].items())
        L.append(
            f"- Marker parts (in `chameleon_group` and `chameleon_user`): {', '.join(mp['markers'])} at "
            f"strength {mp['strength']:g}, layers {mp['layers']}, directions from {mp['n_queries']} "
            f"held-out queries; reported users reached: {reached}."
        )
    if "users_without_own_edit" in runs:
        L.append(
            f"- Reported users without an own edit (too few pairs kept; they get the base model in `chameleon_user`): {runs['users_without_own_edit']}."
        )
    t = res["timings"]
    total = t.get("wall_s_this_invocation", t["total_wall_s"])
    cores = f"{t['cpu_count']} CPU cores visible; " if t.get("cpu_count") else ""
    L.append(
        f"- Wall time of this invocation ({cores}work found in the store or the prediction cache is not "
        f"redone and not counted): {total / 60:.1f} min; per stage (s, cumulative; ablation stages nest): "
        + ", ".join(f"{k} {v:.0f}" for k, v in t["wall_s"].items())
        + ". CPU seconds per stage are in `results.json`."
    )
    L.append(
        f"- Runs in the store: {', '.join(f'{k}=`{v}`' for k, v in runs.items() if isinstance(v, str))}.\n"
    )
    if ab:
        L += _ablation_section(ab, out)
    disc = out / "discussion.md"
    if disc.is_file():
        L.append(disc.read_text().strip() + "\n")
    if res.get("command"):
        L.append("## Reproduce\n")
        L.append("```\n" + res["command"] + "\n```\n")
    L.append(
        "Files: `results.json` (all figures, paired tests, timings), `predictions.parquet` (per user and method: input, "
        "gold, raw answer, scored answer, ROUGE-1/L, group)" + (", `ablations.json`" if ab else "") + ".\n"
    )
    path = out / "report.md"
    path.write_text("\n".join(L))
    return path


def _style_section(M: dict[str, Any]) -> list[str]:
    """Style similarity to the users' unused history items, and why each method scores as it does."""
    rows = [m for m in _display_order(list(M)) if "style" in M[m]]
    if not rows:
        return []
    L = [
        "## Style and diagnostics\n",
        "Style = cosine of character 2-4-gram counts between the answer and the user's history items "
        "that no edit was made from (author verification; higher = closer to the user). Closeness to "
        "input = ROUGE-L of the answer against the tweet inside the LaMP input. Assistant talk = "
        "share of answers that talk like a chatbot (apologies, lead-ins, talk about the tweet).\n",
        "| method | style [95 % CI] | style vs base (diff [CI], p) | assistant talk | closeness to input | length / gold |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        e = M[m]
        vb = e.get("vs_base", {}).get("style")
        vb_s = "" if not vb else f"{vb['diff']:+.4f} {_fmt_ci(vb['diff_ci95'])}, p = {vb['p_bootstrap']:.3f}"
        L.append(
            f"| `{m}` | {e['style']:.3f} {_fmt_ci(e['style_ci95'])} | {vb_s} | {e['assistant_talk'] * 100:.0f} % | "
            f"{e['rougeL_vs_input']:.3f} | {e['length_ratio']:.2f} |"
        )
    L.append("")
    return L


def _two_by_two(M: dict[str, Any]) -> list[str]:
    """ROUGE-L of prompt × edit, so a prompt effect is never read as an edit effect."""
    cells = {
        ("plain", "none"): "base_plain",
        ("plain", "group"): "chameleon_group_plain",
        ("system", "none"): "base",
        ("system", "group"): "chameleon_group",
    }
    if not all(m in M for m in cells.values()):
        return []

    def cell(m: str) -> str:
        return f"{M[m]['rougeL']:.3f}"

    return [
        "## Prompt × edit (ROUGE-L)\n",
        "| prompt | no edit | group edit |",
        "|---|---|---|",
        f"| LaMP input only | {cell('base_plain')} | {cell('chameleon_group_plain')} |",
        f"| + no-preamble system prompt | {cell('base')} | {cell('chameleon_group')} |",
        "",
    ]


def _goals_section(goals: dict[str, Any] | None) -> list[str]:
    if not goals:
        return []
    L = [
        "## Goals of the personalization protocol\n",
        "| goal | relative | difference [95 % CI] | p | met |",
        "|---|---|---|---|---|",
    ]
    for name, g in goals.items():
        if not g.get("evaluated"):
            L.append(f"| {name} | not evaluated | | | |")
            continue
        rel = (
            ""
            if g["rel"] is None
            else f"{g['rel'] * 100:+.1f} % (target {g['kind']} {g['target'] * 100:.0f} %)"
        )
        L.append(
            f"| {name} | {rel} | {g['diff']:+.4f} {_fmt_ci(g['diff_ci95'])} | {g['p']:.3f} | "
            f"{'**met**' if g['met'] else '**not met**'} |"
        )
    L.append("")
    return L


def _ablation_section(ab: dict[str, Any], out: Path) -> list[str]:
    L = ["## Ablations (tuning users only)\n"]
    us = ab["users"]
    L.append(
        f"Edits fitted on tuning users {us['fit_positions'][0]}..{us['fit_positions'][1] - 1} (groups from tuning users only), "
        f"scored on {us['n_scored']} tuning users' own LaMP questions. One factor at a time from the default "
        "(group edit unless stated). These are tuning decisions; no reported user is involved.\n"
    )
    ref = ab["reference"]
    L.append(
        "| setting | level | mean group size | ROUGE-1 [CI] | ROUGE-L [CI] | ROUGE-L vs base (diff [CI], rel, p) |"
    )
    L.append("|---|---|---|---|---|---|")
    for m in ("copy", "base", "rag"):
        if m in ref:
            e = ref[m]
            L.append(
                f"| `{m}` | — | — | {e['rouge1']:.3f} {_fmt_ci(e['rouge1_ci95'])} | {e['rougeL']:.3f} {_fmt_ci(e['rougeL_ci95'])} | |"
            )
    for p in ab["points"]:
        L.append(
            f"| {p['ablation']} = {p['value']} | {p['level']} | {p['mean_group_size']:.1f} | {p['rouge1']:.3f} {_fmt_ci(p['rouge1_ci95'])} | "
            f"{p['rougeL']:.3f} {_fmt_ci(p['rougeL_ci95'])} | {_fmt_cmp(p.get('vs_base', {}).get('rougeL'))} |"
        )
    L.append("")
    hist = ab.get("history")
    if hist:
        L.append(
            f"History size (own synthesis per size, tuning users {hist['users'][0]}..{hist['users'][1] - 1}, {hist['n_users']} users; "
            f"groups of about 5 among them):\n"
        )
        L.append("| history items | level | ROUGE-L [CI] | vs base |")
        L.append("|---|---|---|---|")
        for m in ("copy", "base"):
            e = hist["reference"][m]
            L.append(f"| `{m}` | — | {e['rougeL']:.3f} {_fmt_ci(e['rougeL_ci95'])} | |")
        for p in hist["points"]:
            L.append(
                f"| {p['history_k']} | {p['level']} | {p['rougeL']:.3f} {_fmt_ci(p['rougeL_ci95'])} | {_fmt_cmp(p.get('vs_base', {}).get('rougeL'))} |"
            )
        L.append("")
    for fname, caption in _ablation_plots(ab, out):
        L.append(f"![{caption}]({fname})\n")
        L.append(f"*{caption}*\n")
    sel = ab.get("selected")
    if sel:
        L.append(
            f"Selection rule: {sel['rule']}. Selected: `{sel['label']}` (overrides {sel['overrides']}).\n"
        )
    return L
