"""Ablations on tuning users only: one factor at a time from the default, and the setting chosen.

Edits come from the tuning users' stored pairs, reduced in memory with each setting
(:func:`~chameleon.evaluation.runs.fit_edits`; groups from tuning users only), and the tuning users'
own LaMP questions are scored. No reported user is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from chameleon.config import ChameleonConfig
from chameleon.core.edit import Edit
from chameleon.data.layout import filter_users
from chameleon.evaluation.baselines import copy_answer, rag_prompt
from chameleon.evaluation.cache import key_hash
from chameleon.evaluation.context import EvalContext
from chameleon.evaluation.lamp import LampQuestion
from chameleon.evaluation.runs import (
    FittedEdits,
    config_summary,
    fit_edits,
    history_embeddings,
    read_run_tables,
    recapture_pairs,
    reduce_signature,
    run_synthesis,
    short_hash,
    write_users_jsonl,
)
from chameleon.evaluation.scoring import postprocess, score_methods

__all__ = [
    "AblationPoint",
    "ablation_grid",
    "fit_signature",
    "group_overrides",
    "history_ablation",
    "run_ablations",
    "select_setting",
    "slice_tuning",
    "unseen_points",
]

HISTORY_SIZES: tuple[int | str, ...] = (1, 3, 5, "all")
"""History items per user in the history-size ablation (``all``: every item, up to 512)."""


@dataclass
class AblationPoint:
    """One setting of the grid: which factor, its value, the edit level, and the config overrides."""

    ablation: str
    value: Any
    level: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def ablation_grid(names: Sequence[str]) -> list[AblationPoint]:
    """The points of the named ablations, after the default at group and user level."""
    pts = [AblationPoint("default", "default", "group"), AblationPoint("default", "default", "user")]
    if "alpha" in names:
        pts += [AblationPoint("alpha", a, "group", {"edit.alpha": a}) for a in (0.5, 2.0, 4.0)]
    if "beta" in names:
        pts += [AblationPoint("beta", b, "group", {"edit.beta": b}) for b in (0.0, 2.0)]
    if "n_layers" in names:
        pts += [AblationPoint("n_layers", n, "group", {"subspace.n_layers": n}) for n in (1, 5)]
    if "theta_p" in names:
        pts += [AblationPoint("theta_p", m, "group", {"subspace.theta_p": m}) for m in ("mean_diff",)]
    if "theta_n" in names:
        pts += [AblationPoint("theta_n", "mean_diff", "group", {"subspace.theta_n": "mean_diff"})]
    if "site" in names:
        pts += [AblationPoint("site", "residual", "group", {"subspace.site": "residual"})]
    if "positions" in names:
        # Which token positions get the edit is open in the method (the lab's hooks edit the last
        # position of each call); editing every prompt position is a stronger edit, so weaker α too.
        pts += [
            AblationPoint(
                "positions",
                f"all, α=β={a:g}",
                "group",
                {"edit.positions": "all", "edit.alpha": a, "edit.beta": a},
                note="every position edited",
            )
            for a in (1.0, 0.5, 0.25)
        ]
    if "group_size" in names:
        pts += [
            AblationPoint("group_size", s, "group", {}, note="target users per group") for s in (5, 50, "all")
        ]
    return pts


def group_overrides(target: Any, n_users: int) -> dict[str, Any]:
    """Config overrides for about ``target`` users per group among ``n_users`` (``"all"``: one group)."""
    if target == "all":
        return {"groups.n_groups": 1, "groups.min_group_size": 1, "groups.min_contributors": 1}
    k = max(1, round(n_users / int(target)))
    # An in-memory study of group size: the published runs' privacy floor follows the target, but
    # never above the users a group can have here (a small tuning set would leave no group at all).
    floor = max(1, min(int(target) // 2, n_users // k))
    return {"groups.n_groups": k, "groups.min_group_size": floor, "groups.min_contributors": floor}


def fit_signature(cfg: ChameleonConfig) -> str:
    """What an in-memory fit depends on (the edit settings apply later)."""
    return short_hash({"subspace": cfg.subspace.model_dump(), "groups": cfg.groups.model_dump()})


def slice_tuning(ev: EvalContext, rng: tuple[int, int]) -> list[LampQuestion]:
    """The tuning questions at file positions ``rng`` (which must lie inside the tuning users)."""
    start, stop = rng
    t0, t1 = ev.s.tuning_users
    if start < t0 or stop > t1:
        raise ValueError(f"ablation users {start}:{stop} must lie inside the tuning users {t0}:{t1}")
    return ev.tuning[start - t0 : stop - t0]


def _without_per_user(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "per_user"}


def run_ablations(ev: EvalContext, synth_run: str) -> dict[str, Any]:
    """One-factor-at-a-time ablations on tuning users (never on reported users).

    Edits come from the tuning users' stored pairs (reduced in memory with each setting; groups
    are built from tuning users only), and the tuning users' own LaMP questions are scored. The
    history-size ablation runs a fresh synthesis of ``history_users`` per history size.
    """
    s = ev.s
    tuning_ids = [q.id for q in ev.tuning]
    eval_qs = ev.tuning if s.ablation_users is None else slice_tuning(ev, s.ablation_users)
    eval_ids = [q.id for q in eval_qs]
    golds = [ev.golds[i] for i in eval_ids]
    messages = [q.input for q in eval_qs]
    with ev.clock.stage("ablation:read"):
        pairs, profiles = read_run_tables(ev.store, synth_run, tuning_ids)
        layers = ev.manifest_layers(synth_run)
    base_raw = ev.answers("base", {}, eval_qs, messages)
    preds: dict[str, list[str]] = {
        "copy": [copy_answer(q.input) for q in eval_qs],
        "base": postprocess(base_raw),
    }
    if "rag" in s.methods:
        preds["rag"] = postprocess(
            ev.answers("rag", {"k": s.rag_k}, eval_qs, [rag_prompt(q, s.rag_k) for q in eval_qs])
        )
    points_meta: list[dict[str, Any]] = []
    fits: dict[str, FittedEdits] = {}
    recaptured: dict[str, pa.Table] = {}
    for pt in ablation_grid(s.ablations):
        overrides = dict(pt.overrides)
        if pt.ablation == "group_size":
            overrides.update(group_overrides(pt.value, len(tuning_ids)))
        cfg = ev.cfg.with_overrides(overrides)
        label = f"{pt.ablation}={pt.value}/{pt.level}"
        sig = fit_signature(cfg)
        if sig not in fits:
            with ev.clock.stage("ablation:reduce"):
                tbl = pairs
                site = cfg.subspace.site
                if site != ev.cfg.subspace.site:
                    if site not in recaptured:
                        model, tok = ev.model_tok
                        with ev.clock.stage("ablation:recapture"):
                            recaptured[site] = recapture_pairs(model, tok, pairs, layers, ev.cfg, site)
                    tbl = recaptured[site]
                fits[sig] = fit_edits(tbl, profiles, layers, cfg)
        fit = fits[sig]
        key = {
            "run": synth_run,
            "users_fit": key_hash({"ids": tuning_ids}),
            "fit": sig,
            "level": pt.level,
            "edit": cfg.edit.model_dump(),
        }
        raw = ev.answers(
            f"ablation-{pt.ablation}", key, eval_qs, messages, fit.for_users(eval_ids, pt.level), cfg.edit
        )
        preds[label] = postprocess(raw)
        points_meta.append(
            {
                "label": label,
                "ablation": pt.ablation,
                "value": pt.value,
                "level": pt.level,
                "overrides": overrides,
                "mean_group_size": 1.0 if pt.level == "user" else fit.mean_group_size,
                "n_groups": len(fit.group),
                "users_without_own_edit": sum(e is None for e in fit.for_users(eval_ids, "user")),
                "alpha": cfg.edit.alpha,
                "beta": cfg.edit.beta,
                "note": pt.note,
            }
        )
    if "unseen" in s.ablations:
        default_fit = fits[fit_signature(ev.cfg)]  # the grid's first point is always the default
        for meta, raw in unseen_points(
            ev, synth_run, pairs, profiles, layers, default_fit, eval_qs, messages
        ):
            preds[meta["label"]] = postprocess(raw)
            points_meta.append(meta)
    with ev.clock.stage("ablation:score"):
        scores = score_methods(preds, golds, n_resamples=s.n_resamples, seed=s.seed)
    points = [{**meta, **_without_per_user(scores[meta["label"]])} for meta in points_meta]
    history = history_ablation(ev, synth_run) if "history" in s.ablations else None
    return {
        "model": ev.cfg.model.name_or_path,
        "users": {
            "fit_positions": list(s.tuning_users),
            "scored_positions": list(s.ablation_users or s.tuning_users),
            "n_scored": len(eval_ids),
            "history_positions": list(s.history_users),
        },
        "reference": {m: _without_per_user(scores[m]) for m in ("copy", "base", "rag") if m in scores},
        "points": points,
        "history": history,
        "selected": select_setting(points),
        "default": config_summary(ev.cfg),
    }


def unseen_points(
    ev: EvalContext,
    synth_run: str,
    pairs: pa.Table,
    profiles: pa.Table,
    layers: Sequence[int],
    full: FittedEdits,
    eval_qs: Sequence[LampQuestion],
    messages: Sequence[str],
) -> list[tuple[dict[str, Any], list[str]]]:
    """The unseen-user setting inside the tuning users, and what of it is the assignment rule.

    ``unseen=2-fold``: the tuning users are split in two halves by file position; each half gets
    the group edits fitted on the other half only (group count scaled to keep the default group
    size), assigned from history alone, the job's rule for users it never saw.
    ``assignment=history``: the default fit on all tuning users, but each user takes the group of
    the nearest history centroid instead of its own cluster: the same rule on users that were seen.
    ``full`` is that default fit on all tuning users. Returns (point, raw answers) of both.
    """
    cfg = ev.cfg
    tuning_ids = [q.id for q in ev.tuning]
    eval_ids = [q.id for q in eval_qs]
    hist = history_embeddings(profiles, eval_ids)
    common = {"overrides": {}, "alpha": cfg.edit.alpha, "beta": cfg.edit.beta, "users_without_own_edit": 0}
    out = []
    key = {
        "run": synth_run,
        "users_fit": key_hash({"ids": tuning_ids}),
        "fit": short_hash(reduce_signature(cfg)),
        "assign": "history",
        "edit": cfg.edit.model_dump(),
    }
    raw = ev.answers("ablation-assignment", key, eval_qs, messages, full.for_history(hist), cfg.edit)
    out.append(
        (
            {
                "label": "assignment=history/group",
                "ablation": "assignment",
                "value": "history",
                "level": "group",
                "mean_group_size": full.mean_group_size,
                "n_groups": len(full.group),
                "note": "own cluster replaced by the nearest history centroid",
                **common,
            },
            raw,
        )
    )

    half = len(tuning_ids) // 2
    folds = [tuning_ids[:half], tuning_ids[half:]]
    n_groups = max(1, round(cfg.groups.n_groups * half / max(1, len(tuning_ids))))
    fold_cfg = cfg.with_overrides({"groups.n_groups": n_groups})
    edits: list[Edit | None] = [None] * len(eval_ids)
    sizes = []
    for k, fold in enumerate(folds):
        other = folds[1 - k]
        if not other:
            continue
        with ev.clock.stage("ablation:reduce"):
            fit = fit_edits(filter_users(pairs, other), filter_users(profiles, other), layers, fold_cfg)
        sizes.append(fit.mean_group_size)
        members = set(fold)
        in_fold = [i for i, u in enumerate(eval_ids) if u in members]
        for i, e in zip(in_fold, fit.for_history(hist[in_fold]), strict=True):
            edits[i] = e
    key = {
        "run": synth_run,
        "folds": key_hash({"f": folds}),
        "fit": short_hash(reduce_signature(fold_cfg)),
        "edit": cfg.edit.model_dump(),
    }
    raw = ev.answers("ablation-unseen", key, eval_qs, messages, edits, cfg.edit)
    out.append(
        (
            {
                "label": "unseen=2-fold/unseen",
                "ablation": "unseen",
                "value": "2-fold",
                "level": "unseen",
                "mean_group_size": float(np.mean(sizes)) if sizes else 0.0,
                "n_groups": n_groups,
                "note": "groups fitted on the other half of the tuning users, assigned from history",
                **common,
            },
            raw,
        )
    )
    return out


def select_setting(points: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The group-level setting with the best tuning ROUGE-L among the ablation points whose settings
    can be applied to the stored pairs of the reported run by a config override, if it beats the
    default group edit; else the default. None when no point is eligible.

    Site changes need other stored states, and the history-assignment point is a diagnostic, not a
    setting: neither is eligible."""
    eligible = [p for p in points if p["level"] == "group" and p["ablation"] not in ("site", "assignment")]
    if not eligible:
        return None
    default = next((p for p in eligible if p["ablation"] == "default"), None)
    best = max(eligible, key=lambda p: (p["rougeL"], p["ablation"] == "default"))
    if default is None or best is default or best["rougeL"] <= default["rougeL"]:
        return {
            "label": "default",
            "overrides": {},
            "group_size": None,
            "rougeL_tuning": None if default is None else default["rougeL"],
            "rule": "best tuning ROUGE-L among group-level ablation points; default kept",
        }
    overrides = dict(best["overrides"])
    group_size = None
    if best["ablation"] == "group_size":
        # A number of users per group: the group count is rescaled to each run it is applied to.
        overrides, group_size = {}, best["value"]
    return {
        "label": best["label"],
        "overrides": overrides,
        "group_size": group_size,
        "rougeL_tuning": best["rougeL"],
        "default_rougeL_tuning": default["rougeL"],
        "rule": "best tuning ROUGE-L among group-level ablation points (site and assignment excluded)",
    }


def history_ablation(ev: EvalContext, synth_run: str) -> dict[str, Any]:
    """History size (1, 3, 5, all items) on a few tuning users: one synthesis per size (the main
    synthesis is reused for the configured size). Edits and groups come from these users only."""
    s = ev.s
    qs = slice_tuning(ev, s.history_users)
    ids = [q.id for q in qs]
    golds = [ev.golds[i] for i in ids]
    messages = [q.input for q in qs]
    preds = {
        "copy": [copy_answer(q.input) for q in qs],
        "base": postprocess(ev.answers("base", {}, qs, messages)),
    }
    meta = []
    n_groups = max(1, len(ids) // 5)
    for k in HISTORY_SIZES:
        hk = 512 if k == "all" else int(k)
        cfg = ev.cfg.with_overrides(
            {"synth.history_k": hk, "groups.n_groups": n_groups, "groups.min_group_size": 3}
        )
        run_id = f"{s.run_tag}-hist-{s.history_users[0]}-{s.history_users[1]}-k{k}-" + short_hash(
            {
                "synth": cfg.synth.model_dump(),
                "subspace": cfg.subspace.model_dump(),
                "model": cfg.model.name_or_path,
            }
        )
        if hk == ev.cfg.synth.history_k:
            run_id = synth_run
            pairs, profiles = read_run_tables(ev.store, run_id, ids)
        else:
            path = write_users_jsonl(ev.work / "users" / f"{run_id}.jsonl", qs)
            with ev.clock.stage("ablation:history-synthesis"):
                run_synthesis(
                    path, ev.store, run_id, cfg, model_and_tokenizer=ev.model_tok, progress=ev.progress
                )
            pairs, profiles = read_run_tables(ev.store, run_id)
        layers = ev.manifest_layers(run_id)
        with ev.clock.stage("ablation:reduce"):
            fit = fit_edits(pairs, profiles, layers, cfg)
        for level in ("user", "group"):
            label = f"history={k}/{level}"
            key = {"run": run_id, "level": level, "edit": cfg.edit.model_dump(), "fit": fit_signature(cfg)}
            raw = ev.answers("ablation-history", key, qs, messages, fit.for_users(ids, level), cfg.edit)
            preds[label] = postprocess(raw)
            meta.append(
                {
                    "label": label,
                    "history_k": k,
                    "level": level,
                    "run": run_id,
                    "mean_group_size": 1.0 if level == "user" else fit.mean_group_size,
                }
            )
    scores = score_methods(preds, golds, n_resamples=s.n_resamples, seed=s.seed)
    return {
        "users": [ev.position[ids[0]], ev.position[ids[-1]] + 1],
        "n_users": len(ids),
        "reference": {m: _without_per_user(scores[m]) for m in ("copy", "base")},
        "points": [{**m, **_without_per_user(scores[m["label"]])} for m in meta],
    }
