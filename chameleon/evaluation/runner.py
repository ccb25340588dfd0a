"""Evaluation on real LaMP-7 users: baselines, Chameleon at user / group / unseen-user level, ablations.

What is measured: for one model and a set of LaMP-7 users, each method
(:data:`~chameleon.evaluation.names.METHODS`) answers the user's LaMP question and is scored with the
official LaMP-7 metrics (ROUGE-1, ROUGE-L), per user, with 95 % bootstrap intervals and paired
comparisons (:mod:`chameleon.evaluation.scoring`).

Users follow the split rule (:mod:`chameleon.evaluation.split`): tuning users inform the ablations
and any configuration chosen from them; reported users are only reported.

Costs: the synthesis runs once over tuning + reported users (:mod:`chameleon.evaluation.runs`);
with ``use_ray`` it is the Ray job, and the answers of every method are generated on the same kind
of actor pool. Predictions are cached per method and configuration
(:class:`~chameleon.evaluation.cache.PredictionCache`), so an interrupted evaluation continues where
it stopped. Edits are read once per group (and user shard) of a published run
(:meth:`chameleon.data.published.PublishedRun.edits_for`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from chameleon.config import ChameleonConfig
from chameleon.core.edit import Edit
from chameleon.data.artifacts import RunReader, committed_manifest
from chameleon.data.published import PublishedRun
from chameleon.evaluation.ablations import group_overrides, run_ablations
from chameleon.evaluation.baselines import copy_answer, rag_prompt
from chameleon.evaluation.context import EvalContext
from chameleon.evaluation.lamp import extract_lamp7_tweet, profile_texts
from chameleon.evaluation.names import METHODS
from chameleon.evaluation.personalization import personalization_results
from chameleon.evaluation.report import write_report
from chameleon.evaluation.residuals import RESIDUAL_METHODS, has_parts, residual_edits
from chameleon.evaluation.runs import (
    REDUCE_KEYS,
    config_summary,
    history_embeddings,
    read_run_tables,
    reduce_signature,
)
from chameleon.evaluation.scoring import goal_verdict, goals, postprocess, score_methods, strip_per_user
from chameleon.evaluation.settings import EvalSettings

log = logging.getLogger(__name__)

__all__ = ["EvalContext", "EvalSettings", "run_evaluation"]


GROUP_RUN_METHODS = (
    "chameleon_user",
    "chameleon_group",
    "chameleon_group_plain",
    "random_direction",
    "shuffled",
    *RESIDUAL_METHODS,
)
"""Methods whose edits come from the run over tuning + reported users."""


def random_like(edit: Edit, seed: str) -> Edit:
    """The control for an edit: random unit directions of the same norms at the same layers
    (seeded, so a rerun gives the same control)."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))

    def rand(like: torch.Tensor) -> torch.Tensor:
        r = torch.randn(like.shape, generator=g)
        return r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12) * like.norm(dim=-1, keepdim=True)

    return Edit(
        layers=list(edit.layers),
        theta_p=rand(edit.theta_p),
        theta_n=rand(edit.theta_n),
        mean=edit.mean.clone(),
        site=edit.site,
        steer=None if edit.steer is None else rand(edit.steer),
        renorm=edit.renorm,
    )


def _run_cfg(cfg: ChameleonConfig, group_size: Any, n_users: int) -> ChameleonConfig:
    return cfg if group_size is None else cfg.with_overrides(group_overrides(group_size, n_users))


def _main_methods(
    ev: EvalContext,
    synth_run: str | None,
    cfg: ChameleonConfig,
    methods: Sequence[str] = METHODS,
    group_size: Any = None,
) -> tuple[dict[str, list[str]], dict[str, list[Any]], dict[str, Any]]:
    """Raw answers of each method on the reported users; also per-user group ids and run ids.

    ``group_size`` (users per group, or "all") overrides the group count of each run it builds.
    Edits come from :meth:`PublishedRun.edits_for`: each group edit and user shard is read once."""
    qs = ev.reported
    ids = [q.id for q in qs]
    messages = [q.input for q in qs]
    raw: dict[str, list[str]] = {}
    groups: dict[str, list[Any]] = {}
    info: dict[str, Any] = {}
    edit_key = cfg.edit.model_dump()
    if "copy" in methods:
        raw["copy"] = [copy_answer(q.input) for q in qs]
    if "base" in methods:
        raw["base"] = ev.answers("base", {}, qs, messages)
    if "base_plain" in methods:
        raw["base_plain"] = ev.answers("base", {}, qs, messages, plain=True)
    if "rag" in methods:
        raw["rag"] = ev.answers("rag", {"k": ev.s.rag_k}, qs, [rag_prompt(q, ev.s.rag_k) for q in qs])

    def edited(name: str, run_id: str, edits: Sequence[Edit | None], plain: bool = False) -> list[str]:
        """Answers with the given per-user edits of run `run_id` (cached by name, run and edit settings)."""
        return ev.answers(name, {"run": run_id, "edit": edit_key}, qs, messages, edits, cfg.edit, plain=plain)

    if any(m in methods for m in GROUP_RUN_METHODS):
        all_cfg = _run_cfg(cfg, group_size, len(ev.tuning) + len(ev.reported))
        # The synthesis run's own reduce is used when it was published with exactly this setting.
        done = committed_manifest(ev.store, synth_run)
        published = done.config if done is not None else {}
        same = reduce_signature(all_cfg) == {k: published.get(k) for k in REDUCE_KEYS}
        all_run = synth_run if same else ev.derived(synth_run, "all", all_cfg, None)
        info["run_all"] = all_run
        run = PublishedRun(RunReader(ev.store, all_run))
        if run.manifest.marker_parts:  # what `chameleon_group` and `chameleon_user` add per user
            parts = run.manifest.marker_parts
            info["marker_parts"] = {
                **parts,
                "reported_users": {m: sum(m in run.user_markers(u) for u in ids) for m in parts["markers"]},
            }
        if "chameleon_user" in methods:
            edits = run.edits_for(ids, "user")
            info["users_without_own_edit"] = sum(e is None for e in edits)
            raw["chameleon_user"] = edited("chameleon_user", all_run, edits)
        gids = [run.user_group(u) for u in ids]
        group_edits = run.edits_for(ids, "group", gids)
        if "chameleon_group" in methods:
            groups["chameleon_group"] = gids
            info["groups_all"] = {g.group_id: g.n_users for g in run.manifest.groups}
            raw["chameleon_group"] = edited("chameleon_group", all_run, group_edits)
        if "chameleon_group_plain" in methods:
            raw["chameleon_group_plain"] = edited("chameleon_group", all_run, group_edits, plain=True)
        if "random_direction" in methods:
            groups["random_direction"] = gids
            randomized = {
                g: random_like(run.group_edit(g), seed=f"{cfg.subspace.seed}:{g}") for g in run.group_ids
            }
            raw["random_direction"] = edited(
                "random_direction", all_run, [randomized[g] if g else None for g in gids]
            )
        if "shuffled" in methods and len(run.group_ids) < 2:
            info["shuffled"] = "not run: the run has one group, so there is no other group's edit"
        if "shuffled" in methods and len(run.group_ids) > 1:
            other = {g: run.group_ids[(k + 1) % len(run.group_ids)] for k, g in enumerate(run.group_ids)}
            groups["shuffled"] = [other[g] if g else None for g in gids]
            raw["shuffled"] = edited("shuffled", all_run, run.edits_for(ids, "group", groups["shuffled"]))
        if has_parts(run):  # residual composition: the global part and the controls from the parts
            parts = residual_edits(run, ids, gids, seed=str(cfg.subspace.seed))
            for name in ("chameleon_global", *RESIDUAL_METHODS):
                if name in methods:
                    groups[name] = gids
                    raw[name] = edited(name, all_run, parts[name])
        elif any(m in methods for m in RESIDUAL_METHODS):
            info["residual_controls"] = "not run: the run's edits are not composed of residual parts"
    if "chameleon_global" in methods and "chameleon_global" not in raw:
        g_run = ev.derived(synth_run, "global", cfg.with_overrides({"groups.n_groups": 1}), None)
        info["run_global"] = g_run
        raw["chameleon_global"] = edited(
            "chameleon_global", g_run, PublishedRun(RunReader(ev.store, g_run)).edits_for(ids, "group")
        )
    if "chameleon_unseen" in methods:
        tuning_ids = [q.id for q in ev.tuning]
        t_run = ev.derived(synth_run, "tuning", _run_cfg(cfg, group_size, len(tuning_ids)), tuning_ids)
        info["run_tuning"] = t_run
        run_t = PublishedRun(RunReader(ev.store, t_run))
        _, profiles = read_run_tables(ev.store, synth_run, ids)
        gids, _ = run_t.assign_unseen(history_embeddings(profiles, ids))
        groups["chameleon_unseen"] = gids
        info["groups_tuning"] = {g.group_id: g.n_users for g in run_t.manifest.groups}
        raw["chameleon_unseen"] = edited("chameleon_unseen", t_run, run_t.edits_for(ids, "group", gids))
    return raw, groups, info


def _marker_parts_per_user(ev: EvalContext, run_id: str | None) -> list[list[str]] | None:
    """Per reported user, the markers their served rows in run `run_id` (the `chameleon_*`
    methods' run) add; None when that run has no marker parts or there is none."""
    if run_id is None:
        return None
    run = PublishedRun(RunReader(ev.store, run_id))
    if not run.manifest.marker_parts:
        return None
    return [list(run.user_markers(q.id)) for q in ev.reported]


def run_evaluation(
    settings: EvalSettings, cfg: ChameleonConfig, *, model_and_tokenizer=None, progress: bool = True
) -> dict[str, Any]:
    """The whole evaluation: synthesis over tuning + reported users, ablations (tuning users) when
    asked, the methods on the reported users, scores, results.json, predictions.parquet, report.

    Returns the results dict (also written to ``<out_dir>/results.json``).
    """
    ev = EvalContext.open(settings, cfg, model_and_tokenizer, progress)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model_methods = [
        m for m in settings.methods if m in (*GROUP_RUN_METHODS, "chameleon_unseen", "chameleon_global")
    ]
    synth_run = ev.ensure_synthesis() if model_methods or settings.ablations else None

    # The default configuration first: its answers are cached before the (long) ablations start.
    raw, groups, info = _main_methods(ev, synth_run, cfg, methods=settings.methods)
    ablations = None
    final_cfg, group_size = cfg, None
    if settings.ablations:
        ab_run = settings.ablation_run
        if ab_run and committed_manifest(ev.store, ab_run) is None:
            log.warning("ablation run %s is not in the store; the ablations use this synthesis", ab_run)
            ab_run = None
        ablations = run_ablations(ev, ab_run or synth_run)
        (out / "ablations.json").write_text(json.dumps(ablations, indent=2) + "\n")
        selected = ablations.get("selected") or {}
        if settings.select_on_tuning and selected:
            final_cfg = cfg.with_overrides(selected["overrides"])
            group_size = selected.get("group_size")
    tuned = group_size is not None or reduce_signature(final_cfg) != reduce_signature(cfg)
    if tuned:
        # `chameleon_*` = the setting chosen on tuning users; the default's answers become `*_default`.
        chameleon = [m for m in settings.methods if m.startswith("chameleon")]
        raw_t, groups_t, info_t = _main_methods(
            ev, synth_run, final_cfg, methods=chameleon, group_size=group_size
        )
        for m in chameleon:
            raw[m + "_default"] = raw.pop(m)
            if m in groups:
                groups[m + "_default"] = groups.pop(m)
        info = {**{f"{k}_default": v for k, v in info.items()}, **info_t}
        raw.update(raw_t)
        groups.update(groups_t)

    marker_parts = _marker_parts_per_user(ev, info.get("run_all"))
    with ev.clock.stage("score"):
        preds = {m: postprocess(r) for m, r in raw.items()}
        golds = [ev.golds[q.id] for q in ev.reported]
        references = style_references(ev, synth_run)
        scores = score_methods(
            preds,
            golds,
            n_resamples=settings.n_resamples,
            seed=settings.seed,
            style_references=references,
            inputs=[extract_lamp7_tweet(q.input) for q in ev.reported],
        )
        # Attribution, marker transfer, closeness-adjusted gain, issue 18's goals, `per_user`.
        personal = personalization_results(
            [q.id for q in ev.reported],
            references,
            preds,
            scores,
            marker_parts=marker_parts,
            n_resamples=settings.n_resamples,
            seed=settings.seed,
        )
    order = [m for m in METHODS if m in scores] + sorted(m for m in scores if m not in METHODS)
    stripped = strip_per_user(scores)
    results = {
        "model": cfg.model.name_or_path,
        "n_users": len(ev.reported),
        "task": "LaMP_7 (dev, user-based split)",
        "phase": "validation (held-out tuning users)" if settings.validation else "reported",
        "users": {
            "reported_positions": list(settings.reported_users),
            "tuning_positions": list(settings.tuning_users),
            "reported_ids": [ev.reported[0].id, ev.reported[-1].id],
        },
        "methods": {m: stripped[m] for m in order},
        "goal": goal_verdict(scores),
        "goals": goals(scores),
        "config": {
            "final": config_summary(final_cfg),
            "default": config_summary(cfg),
            "final_group_size": group_size,
            "selected_on_tuning": bool(tuned),
            "selected": (ablations or {}).get("selected") if settings.select_on_tuning else None,
        },
        "generation": {
            "decoding": "greedy",
            "max_new_tokens": settings.max_new_tokens,
            "batch_size": settings.batch_size,
            "postprocess": "core.generation.first_answer_line",
            "rag_k": settings.rag_k,
            "prompt": "chat template, one user message (the LaMP input; RAG: LaMP-7 retrieval prompt)",
        },
        "scoring": {
            "metric": "rouge_score 0.1.2 rouge1/rougeL F-measure, no stemming, mean over users",
            "bootstrap": {"n_resamples": settings.n_resamples, "seed": settings.seed, "ci": 0.95},
        },
        "runs": {"synthesis": synth_run, **info},
        "timings": {
            **ev.clock.as_dict(),
            "wall_s_this_invocation": round(time.perf_counter() - t_start, 1),
            "cpu_count": os.cpu_count(),
        },
        "command": settings.command,
        **personal,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_predictions(out / "predictions.parquet", ev, raw, preds, scores, groups)
    write_report(out)
    return results


def style_references(ev: EvalContext, synth_run: str | None) -> list[list[str]]:
    """Per reported user, the profile tweets no edit was made from: neither a pair's nor a held-out
    (calibration) item of the synthesis run."""
    used: dict[str, tuple[set[int], set[str]]] = {}
    if synth_run is not None:
        _, profiles = read_run_tables(ev.store, synth_run, [q.id for q in ev.reported])
        held = (
            profiles.column("heldout_text").to_pylist() if "heldout_text" in profiles.column_names else None
        )
        for k, (uid, sel) in enumerate(
            zip(profiles.column("user_id").to_pylist(), profiles.column("selected").to_pylist(), strict=True)
        ):
            used[uid] = (set(sel or []), set((held[k] if held else None) or []))
    refs = []
    for q in ev.reported:
        sel, held = used.get(q.id, (set(), set()))
        refs.append([t for i, t in enumerate(profile_texts(q)) if t and i not in sel and t not in held])
    return refs


def _write_predictions(path: Path, ev: EvalContext, raw, preds, scores, groups) -> None:
    rows: dict[str, list] = {
        k: []
        for k in (
            "user_id",
            "position",
            "method",
            "input",
            "gold",
            "raw",
            "prediction",
            "rouge1",
            "rougeL",
            "group_id",
        )
    }
    for m in raw:
        for i, q in enumerate(ev.reported):
            rows["user_id"].append(q.id)
            rows["position"].append(ev.position[q.id])
            rows["method"].append(m)
            rows["input"].append(q.input)
            rows["gold"].append(ev.golds[q.id])
            rows["raw"].append(raw[m][i])
            rows["prediction"].append(preds[m][i])
            rows["rouge1"].append(scores[m]["per_user"]["rouge1"][i])
            rows["rougeL"].append(scores[m]["per_user"]["rougeL"][i])
            rows["group_id"].append(groups[m][i] if m in groups else None)
    pq.write_table(pa.table(rows), path)
