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

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from chameleon.config import ChameleonConfig, EditConfig
from chameleon.core.edit import Edit
from chameleon.core.generation import generate_answers
from chameleon.core.model import load_model
from chameleon.data.artifacts import RunReader
from chameleon.data.published import PublishedRun
from chameleon.data.storage import LocalStore, open_store
from chameleon.evaluation.ablations import group_overrides, run_ablations
from chameleon.evaluation.baselines import copy_answer, rag_prompt
from chameleon.evaluation.cache import PredictionCache, key_hash
from chameleon.evaluation.lamp import LampQuestion, extract_lamp7_tweet, load_lamp7, profile_texts
from chameleon.evaluation.names import ABLATIONS, METHODS, NO_PREAMBLE
from chameleon.evaluation.personalization import personalization_results
from chameleon.evaluation.report import write_report
from chameleon.evaluation.runs import (
    REDUCE_KEYS,
    committed_manifest,
    config_summary,
    derive_run,
    history_embeddings,
    read_run_tables,
    reduce_signature,
    run_synthesis,
    seed_partitions,
    short_hash,
    write_users_jsonl,
)
from chameleon.evaluation.scoring import goal_verdict, goals, postprocess, score_methods, strip_per_user
from chameleon.evaluation.split import parse_range, select_users
from chameleon.job.calibrate import calibrate_in_process
from chameleon.job.drivers import answers_on_ray

log = logging.getLogger(__name__)

__all__ = ["EvalSettings", "Evaluator", "run_evaluation"]


@dataclass
class EvalSettings:
    """Everything that decides what an evaluation computes (besides the ChameleonConfig)."""

    out_dir: str
    """Where results.json, predictions.parquet, report.md and plots go."""
    workdir: str = ".cache/eval"
    """Users files, the prediction cache and (without ``store``) the store of runs: resumable state."""
    store: str | None = None
    """Store of the runs (``s3://bucket/prefix`` or a path; a cluster's actors must reach it);
    default ``<workdir>/store``."""
    store_options: dict[str, Any] = field(default_factory=dict)
    """Options of an ``s3://`` store (e.g. ``endpoint_url``)."""
    lamp_dir: str | None = None
    tuning_users: tuple[int, int] = (0, 100)
    """File positions of the tuning users (synthesis + groups; ablations)."""
    reported_users: tuple[int, int] = (500, 600)
    """File positions of the reported users (must be past the tuning part)."""
    methods: tuple[str, ...] = METHODS
    rag_k: int = 3
    validation: bool = False
    """A tuning-phase run: the scored ("reported") users are held-out tuning users (0..499, disjoint
    from ``tuning_users``); decisions are taken on such runs only."""
    system_prompt: str | None = NO_PREAMBLE
    """The system turn of every method's prompt (``*_plain`` methods: none)."""
    max_new_tokens: int = 48
    """Answer budget of every evaluated method (greedy)."""
    batch_size: int = 16
    n_resamples: int = 1000
    seed: int = 0
    run_tag: str = "lamp7"
    """Prefix of the run ids in the store."""
    synth_run: str | None = None
    """Run id of the synthesis (created when absent, reused when committed); default: derived from
    the tag, the users and the synthesis settings."""
    reuse_synthesis_from: str | None = None
    """A committed synthesis run whose partitions with the same users are copied instead of
    generated again (see :func:`~chameleon.evaluation.runs.seed_partitions`)."""
    use_ray: bool = False
    """Run the synthesis as the Ray job and generate every method's answers on a Ray Data actor
    pool (``cfg.job`` sizes both); otherwise everything runs in this process."""
    address: str | None = None
    """Ray cluster address with ``use_ray`` (default ``RAY_ADDRESS``, else a new local Ray)."""
    ablations: tuple[str, ...] = ()
    ablation_run: str | None = None
    """Committed run whose pairs of the tuning users feed the ablations (default: this evaluation's
    synthesis); lets an extended evaluation reuse the ablations of an earlier one."""
    ablation_users: tuple[int, int] | None = None
    """Tuning users scored in the ablations (default: all tuning users)."""
    history_users: tuple[int, int] = (0, 20)
    """Tuning users of the history-size ablation (needs its own synthesis)."""
    select_on_tuning: bool = False
    """Pick the reduce/edit configuration of the reported run from the ablations (tuning users)."""
    command: str = ""
    """The command line that produced the results (written into the report)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"unknown ablations {bad}; known: {', '.join(ABLATIONS)}")
        self.tuning_users = parse_range(self.tuning_users)
        self.reported_users = parse_range(self.reported_users)
        if self.ablation_users is not None:
            self.ablation_users = parse_range(self.ablation_users)
        self.history_users = parse_range(self.history_users)


class _Clock:
    """Wall and CPU seconds per stage (CPU shows how much a shared machine slowed the wall time)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
            log.info("stage %s done in %.1f s", name, self.wall[name])

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": {k: round(v, 1) for k, v in self.wall.items()},
            "cpu_s": {k: round(v, 1) for k, v in self.cpu.items()},
            "total_wall_s": round(sum(self.wall.values()), 1),
        }


class Evaluator:
    """State shared by the stages of one evaluation: data, model, store, cache, clock."""

    def __init__(
        self, settings: EvalSettings, cfg: ChameleonConfig, model_and_tokenizer=None, progress: bool = True
    ) -> None:
        self.s = settings
        self.cfg = cfg
        self.progress = progress
        self.clock = _Clock()
        self.work = Path(settings.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.store = (
            open_store(settings.store, **settings.store_options)
            if settings.store
            else LocalStore(self.work / "store")
        )
        self.cache = PredictionCache(self.work / "predictions")
        questions, self.golds = load_lamp7(settings.lamp_dir)
        self.position = {q.id: i for i, q in enumerate(questions)}
        self.tuning, self.reported = select_users(
            questions, settings.tuning_users, settings.reported_users, validation=settings.validation
        )
        self._mt = model_and_tokenizer

    # -- model -----------------------------------------------------------------------------
    @property
    def model_tok(self):
        """(model, tokenizer), loaded on first use."""
        if self._mt is None:
            self._mt = load_model(self.cfg.model)
        return self._mt

    def gen_key(self) -> dict[str, Any]:
        return {
            "model": self.cfg.model.name_or_path,
            "revision": self.cfg.model.revision,
            "max_new_tokens": self.s.max_new_tokens,
            "batch_size": self.s.batch_size,
        }

    def _bar(self, name: str) -> Callable[[int, int], None] | None:
        if not self.progress:
            return None
        last = [0.0]

        def cb(done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last[0] > 30:
                last[0] = now
                log.info("  %s: %d/%d answers", name, done, total)

        return cb

    def answers(
        self,
        name: str,
        key: dict[str, Any],
        questions: Sequence[LampQuestion],
        messages: Sequence[str],
        edits: Sequence[Edit | None] | None = None,
        edit_cfg: EditConfig | None = None,
        plain: bool = False,
    ) -> list[str]:
        """Raw answers (cached by ``name`` + ``key`` + users), under the settings' system prompt
        (none when ``plain``)."""
        ids = [q.id for q in questions]
        system = None if plain else self.s.system_prompt
        full = {
            **self.gen_key(),
            **key,
            "system": system,
            "name": name,
            "users": key_hash({"ids": ids}),
            "messages": key_hash({"m": list(messages)}),
        }

        def produce() -> list[str]:
            if self.s.use_ray:
                return answers_on_ray(
                    self.cfg,
                    messages,
                    edits=edits,
                    edit_cfg=edit_cfg,
                    system=system,
                    max_new_tokens=self.s.max_new_tokens,
                    batch_size=self.s.batch_size,
                    address=self.s.address,
                )
            model, tok = self.model_tok
            return generate_answers(
                model,
                tok,
                messages,
                edits=edits,
                edit_cfg=edit_cfg,
                system=system,
                max_new_tokens=self.s.max_new_tokens,
                batch_size=self.s.batch_size,
                progress=self._bar(name),
            )

        with self.clock.stage(f"generate:{name}"):
            raw, hit = self.cache.cached(name, full, ids, produce)
        if hit:
            log.info("  %s: %d answers from the cache", name, len(raw))
        return raw

    # -- runs ------------------------------------------------------------------------------
    def synth_run_id(self) -> str:
        if self.s.synth_run:
            return self.s.synth_run
        t, r = self.s.tuning_users, self.s.reported_users
        sig = short_hash(
            {
                "synth": self.cfg.synth.model_dump(),
                "subspace": self.cfg.subspace.model_dump(),
                "model": self.cfg.model.name_or_path,
            }
        )
        return f"{self.s.run_tag}-t{t[0]}-{t[1]}-r{r[0]}-{r[1]}-{sig}"

    def ensure_synthesis(self) -> str:
        run_id = self.synth_run_id()
        path = write_users_jsonl(self.work / "users" / f"{run_id}.jsonl", self.tuning + self.reported)
        reuse = self.s.reuse_synthesis_from
        if reuse and reuse != run_id and committed_manifest(self.store, reuse) is None:
            log.warning("run %s (to reuse) is not in %s; synthesizing every user", reuse, self.store.uri)
        elif reuse and reuse != run_id:
            copied = seed_partitions(self.store, reuse, run_id, path, self.cfg)
            log.info("reused %d partitions of run %s", len(copied), reuse)
        with self.clock.stage("synthesis"):
            model_tok = None if self.s.use_ray else self.model_tok
            run_synthesis(
                path,
                self.store,
                run_id,
                self.cfg,
                model_and_tokenizer=model_tok,
                use_ray=self.s.use_ray,
                address=self.s.address,
                progress=self.progress,
                store_options=self.s.store_options,
            )
        return run_id

    def derived(self, src: str, name: str, cfg: ChameleonConfig, user_ids: Sequence[str] | None) -> str:
        run_id = f"{src}-{name}-{short_hash(reduce_signature(cfg))}"
        model, tok = self.model_tok
        with self.clock.stage("reduce"):
            derive_run(
                self.store, src, run_id, cfg, user_ids, partial(calibrate_in_process, model, tok, cfg=cfg)
            )
        return run_id

    def manifest_layers(self, run_id: str) -> list[int]:
        return list(committed_manifest(self.store, run_id)["captured_layers"])


GROUP_RUN_METHODS = (
    "chameleon_user",
    "chameleon_group",
    "chameleon_group_plain",
    "random_direction",
    "shuffled",
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
    ev: Evaluator,
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
        published = (committed_manifest(ev.store, synth_run) or {}).get("config", {})
        same = reduce_signature(all_cfg) == {k: published.get(k) for k in REDUCE_KEYS}
        all_run = synth_run if same else ev.derived(synth_run, "all", all_cfg, None)
        info["run_all"] = all_run
        run = PublishedRun(RunReader(ev.store, all_run))
        if "chameleon_user" in methods:
            edits = run.edits_for(ids, "user")
            info["users_without_own_edit"] = sum(e is None for e in edits)
            raw["chameleon_user"] = edited("chameleon_user", all_run, edits)
        gids = [run.user_group(u) for u in ids]
        group_edits = run.edits_for(ids, "group", gids)
        if "chameleon_group" in methods:
            groups["chameleon_group"] = gids
            info["groups_all"] = {g["group_id"]: g["n_users"] for g in run.manifest["groups"]}
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
    if "chameleon_global" in methods:
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
        info["groups_tuning"] = {g["group_id"]: g["n_users"] for g in run_t.manifest["groups"]}
        raw["chameleon_unseen"] = edited("chameleon_unseen", t_run, run_t.edits_for(ids, "group", gids))
    return raw, groups, info


def run_evaluation(
    settings: EvalSettings, cfg: ChameleonConfig, *, model_and_tokenizer=None, progress: bool = True
) -> dict[str, Any]:
    """The whole evaluation: synthesis over tuning + reported users, ablations (tuning users) when
    asked, the methods on the reported users, scores, results.json, predictions.parquet, report.

    Returns the results dict (also written to ``<out_dir>/results.json``).
    """
    ev = Evaluator(settings, cfg, model_and_tokenizer, progress)
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


def style_references(ev: Evaluator, synth_run: str | None) -> list[list[str]]:
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


def _write_predictions(path: Path, ev: Evaluator, raw, preds, scores, groups) -> None:
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
