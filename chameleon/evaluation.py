"""Evaluation on real LaMP-7 users: baselines, Chameleon at user / group / unseen-user level, ablations.

What is measured (issue "Evaluation"): for one model and a set of LaMP-7 users, each method answers
the user's LaMP question and is scored with the official LaMP-7 metrics (ROUGE-1, ROUGE-L,
:mod:`chameleon.metrics`), per user, with 95 % bootstrap intervals and paired comparisons.

Methods (names as written to ``results.json``):

- ``copy``: the tweet inside the LaMP input, no model (the sanity line every report carries).
- ``base``: the instruction-tuned model alone, the LaMP input as the one user message.
- ``rag``: LaMP's retrieval baseline: the top-k profile tweets by BM25 (:mod:`chameleon.retrieval`,
  the ``bm25s`` package) in LaMP-7's own prompt form, then the LaMP input.
- ``chameleon_user``: each user's own edit (users without one fall back to the base model).
- ``chameleon_group``: the user's group edit; groups from the tuning users plus the reported users.
- ``chameleon_unseen``: groups from the tuning users only; each reported user is assigned to the
  nearest group from the embedding of its history alone (``PublishedRun.assign_unseen``).

The split rule: users are addressed by their position in the LaMP file; the first
:data:`~chameleon.lamp.N_TUNING` (500) are the only ones any tuning decision may look at
(ablations, the configuration chosen from them), the others are reported. :func:`select_users`
refuses a reported slice that reaches into the tuning part and the reverse.

Costs: the synthesis (fake it) runs once over tuning + reported users, as one job (in-process or the
Ray job's map stage; with ``use_ray`` the answers of every method are generated on the same kind of
actor pool, :func:`chameleon.pipeline.generate_answers_on_ray`); its partitions hold the pairs and hidden states, so every reduce-side variant
(θP/θN method, number of layers, group size, α/β) re-reduces them in memory without generating
again. Predictions are cached per method and configuration (Parquet under the work dir), so an
interrupted evaluation continues where it stopped.

This module does not import Ray (``use_ray=True`` imports :mod:`chameleon.pipeline` lazily).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from chameleon import metrics
from chameleon.config import ChameleonConfig, EditConfig
from chameleon.edit import Edit, EditBank
from chameleon.lamp import N_TUNING, LampQuestion, extract_lamp7_tweet, lamp_to_user_records, profile_texts
from chameleon.retrieval import bm25_top_k

log = logging.getLogger(__name__)

__all__ = [
    "ABLATIONS",
    "GOAL_REL_ROUGE_L",
    "METHODS",
    "EvalSettings",
    "FittedEdits",
    "PredictionCache",
    "copy_answer",
    "fit_edits",
    "generate_answers",
    "goal_verdict",
    "parse_range",
    "rag_prompt",
    "run_evaluation",
    "score_methods",
    "select_users",
    "write_report",
]

METHODS = ("copy", "base", "rag", "chameleon_user", "chameleon_group", "chameleon_unseen")
"""Every method of the main evaluation, in report order."""

MODEL_METHODS = METHODS[1:]
REFERENCES = ("base", "rag")
"""Methods every other method is compared with (paired, per user)."""

GOAL_REL_ROUGE_L = 0.15
"""The project's goal: Chameleon (group level) beats base by at least this relative ROUGE-L."""

ABLATIONS = ("alpha", "beta", "n_layers", "theta_p", "theta_n", "site", "positions", "group_size", "unseen", "history")
"""Ablations run on tuning users; ``history`` needs its own (small) synthesis."""

EVAL_SYNTH_DEFAULTS: dict[str, Any] = {
    "synth.pairs_per_user": 4,
    "synth.insight_max_new_tokens": 48,
    "synth.answer_max_new_tokens": 40,
    "job.users_per_partition": 25,
}
"""Synthesis settings of the evaluation when no config file is given (sized for 2 CPU cores)."""


# =============================================================================================
# Users and the split rule


def parse_range(text: str | Sequence[int]) -> tuple[int, int]:
    """``"500:600"`` (or ``(500, 600)``) → ``(500, 600)``: file positions, start included, stop excluded."""
    if isinstance(text, str):
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"a user range is START:STOP (file positions), got {text!r}")
        try:
            start, stop = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"a user range is START:STOP with integers, got {text!r}") from None
    else:
        start, stop = (int(x) for x in text)
    if not 0 <= start < stop:
        raise ValueError(f"user range {start}:{stop} is empty or negative")
    return start, stop


def select_users(
    questions: Sequence[LampQuestion],
    tuning: tuple[int, int] | None,
    reported: tuple[int, int] | None,
    n_tuning: int = N_TUNING,
) -> tuple[list[LampQuestion], list[LampQuestion]]:
    """The tuning and reported questions, by file position, enforcing the split rule.

    Tuning positions must lie in ``[0, n_tuning)`` and reported positions in ``[n_tuning, len)``:
    a reported user is never used for a tuning decision, and a tuning user is never reported.
    """
    n = len(questions)
    out: list[list[LampQuestion]] = []
    for name, rng, lo, hi in (("tuning", tuning, 0, min(n_tuning, n)), ("reported", reported, n_tuning, n)):
        if rng is None:
            out.append([])
            continue
        start, stop = parse_range(rng)
        if start < lo or stop > hi:
            raise ValueError(
                f"{name} users {start}:{stop} break the split rule: {name} positions must lie in {lo}:{hi} "
                f"(the first {n_tuning} users in file order are for tuning, the rest for reporting)"
            )
        out.append(list(questions[start:stop]))
    return out[0], out[1]


# =============================================================================================
# Baselines' prompts


def copy_answer(lamp_input: str) -> str:
    """The ``copy`` method: the tweet inside the LaMP-7 input."""
    return extract_lamp7_tweet(lamp_input)


def rag_items(question: LampQuestion, k: int) -> list[int]:
    """Indices of the top-k profile items by BM25, the tweet of the input as the query (LaMP's rule)."""
    return bm25_top_k(extract_lamp7_tweet(question.input), profile_texts(question), k)


def rag_prompt(question: LampQuestion, k: int, max_item_chars: int = 300) -> str:
    """LaMP-7's retrieval prompt: ``"t1" , and "t2"  are written by a person. Following the given
    patterns <input>`` with the top-k profile tweets by BM25 (k = 0 gives the plain input).

    The form follows LaMP's ``create_parphrase_tweet_prompt``; items are cut to ``max_item_chars``
    characters instead of LaMP's per-item token budget (tweets are short; the cut rarely acts).
    """
    if k <= 0:
        return question.input
    texts = profile_texts(question)
    items = []
    for i in rag_items(question, k):
        t = " ".join(texts[i].split())
        items.append(f'"{t[:max_item_chars]}" ')
    if not items:
        return question.input
    return f"{', and '.join(items)} are written by a person. Following the given patterns {question.input}"


# =============================================================================================
# Generation


def distinct_edits(edits: Sequence[Edit | None]) -> tuple[list[Edit], list[int]]:
    """(the distinct edits, by identity, in first-use order; per row its index there or -1 for none).
    Users of one group share one Edit object, so a bank gets one row per group, not per user."""
    index_of: dict[int, int] = {}
    unique: list[Edit] = []
    index = []
    for e in edits:
        if e is None:
            index.append(-1)
            continue
        if id(e) not in index_of:
            index_of[id(e)] = len(unique)
            unique.append(e)
        index.append(index_of[id(e)])
    return unique, index


def bank_for_edits(model, edits: Sequence[Edit], edit_cfg: EditConfig) -> tuple[EditBank, list[int]]:
    """An EditBank with the given (distinct) edits as rows 1..n; returns (bank, rows)."""
    from chameleon.model import hidden_size, model_device  # noqa: PLC0415

    sites = {e.site for e in edits}
    if len(sites) > 1:
        raise ValueError(f"edits of one bank must share a site, got {sorted(sites)}")
    layers = sorted({layer for e in edits for layer in e.layers})
    max_rank = max(int(e.theta_p.shape[1]) for e in edits)
    bank = EditBank(hidden_size(model), layers, site=sites.pop(), max_rank=max_rank,
                    positions=edit_cfg.positions, device=model_device(model))
    rows = bank.add_many(list(edits), alpha=edit_cfg.alpha, beta=edit_cfg.beta, centered=edit_cfg.centered)
    return bank, rows


def generate_answers(
    model,
    tok,
    messages: Sequence[str],
    *,
    edits: Sequence[Edit | None] | None = None,
    edit_cfg: EditConfig | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy raw answers to each user message (chat template, one user turn), optionally with
    ``edits[i]`` applied to message i (None = base model for that row).

    Messages are batched in order of their token length (less padding, same results for a given
    set), and returned in input order. Post-process with :func:`metrics.first_answer_line`.
    """
    from chameleon.generation import chat_prompt, generate  # noqa: PLC0415

    n = len(messages)
    if edits is not None and len(edits) != n:
        raise ValueError(f"{len(edits)} edits for {n} messages")
    prompts = [chat_prompt(tok, m) for m in messages]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    bank, row_of = None, [0] * n
    unique, index = distinct_edits(edits or [])
    if unique:
        bank, rows = bank_for_edits(model, unique, edit_cfg or EditConfig())
        row_of = [0 if i < 0 else rows[i] for i in index]
    out: list[str | None] = [None] * n
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        kwargs: dict[str, Any] = {}
        if bank is not None:
            kwargs = {"bank": bank, "rows": [row_of[i] for i in idx]}
        texts = generate(model, tok, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                         batch_size=len(idx), **kwargs)
        for i, t in zip(idx, texts, strict=True):
            out[i] = t
        if progress:
            progress(min(start + batch_size, n), n)
    return [o or "" for o in out]


# =============================================================================================
# Prediction cache (resume)


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PredictionCache:
    """Raw answers per (method, configuration, users), one Parquet file each, under ``root``.

    A rerun with the same key reads the file instead of generating: an interrupted evaluation
    loses at most the method it was generating.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str, key: dict[str, Any]) -> Path:
        return self.root / f"{name}-{_key_hash(key)}.parquet"

    def get(self, name: str, key: dict[str, Any], user_ids: Sequence[str]) -> list[str] | None:
        p = self.path(name, key)
        if not p.is_file():
            return None
        t = pq.read_table(p)
        got = dict(zip(t.column("user_id").to_pylist(), t.column("raw").to_pylist(), strict=True))
        if not all(u in got for u in user_ids):
            return None
        return [got[u] for u in user_ids]

    def put(self, name: str, key: dict[str, Any], user_ids: Sequence[str], raw: Sequence[str]) -> Path:
        p = self.path(name, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"user_id": pa.array(list(user_ids), pa.string()), "raw": pa.array(list(raw), pa.string())})
        table = table.replace_schema_metadata({"key": json.dumps(key, sort_keys=True, default=str)})
        tmp = p.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(p)
        return p

    def cached(
        self, name: str, key: dict[str, Any], user_ids: Sequence[str], produce: Callable[[], list[str]]
    ) -> tuple[list[str], bool]:
        """(raw answers, came from the cache)."""
        hit = self.get(name, key, user_ids)
        if hit is not None:
            return hit, True
        raw = produce()
        self.put(name, key, user_ids, raw)
        return raw, False


# =============================================================================================
# Scoring


def _ci(values: Sequence[float], n_resamples: int, seed: int) -> dict[str, Any]:
    ci = metrics.bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return {"mean": ci.mean, "ci95": [ci.low, ci.high]}


def paired_comparison(a: Sequence[float], b: Sequence[float], n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
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
        for metric in ("rouge1", "rougeL"):
            c = _ci(scores[metric], n_resamples, seed)
            entry[metric] = c["mean"]
            entry[f"{metric}_ci95"] = c["ci95"]
        for ref in (*references, "copy"):
            if ref in per and ref != m:
                entry[f"vs_{ref}"] = {
                    metric: paired_comparison(scores[metric], per[ref][metric], n_resamples, seed)
                    for metric in ("rouge1", "rougeL")
                }
        entry["per_user"] = scores
        out[m] = entry
    return out


def goal_verdict(methods: dict[str, dict[str, Any]], method: str = "chameleon_group", target_rel: float = GOAL_REL_ROUGE_L) -> dict[str, Any]:
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


def _strip_per_user(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m: {k: v for k, v in e.items() if k != "per_user"} for m, e in methods.items()}


# =============================================================================================
# Runs: synthesis, derived reduces, reading partitions


def write_users_jsonl(path: str | Path, questions: Sequence[LampQuestion]) -> Path:
    """The project's user records (LaMP-7 profile → history) of ``questions``, one JSON line each."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    recs = lamp_to_user_records(questions)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return p


def committed_manifest(store, run_id: str) -> dict[str, Any] | None:
    from chameleon.artifacts import RunNotFoundError, RunReader  # noqa: PLC0415

    try:
        return RunReader(store, run_id).manifest
    except RunNotFoundError:
        return None


def run_synthesis(
    users_path: str | Path,
    store,
    run_id: str,
    cfg: ChameleonConfig,
    *,
    model_and_tokenizer=None,
    use_ray: bool = False,
    address: str | None = None,
    progress: bool = True,
    store_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job over the users file (fake it for every user, reduce, publish) unless ``run_id`` is
    already committed in ``store``; an interrupted run resumes from its finished partitions."""
    done = committed_manifest(store, run_id)
    if done is not None:
        log.info("run %s already committed; reusing it", run_id)
        return done
    if use_ray:
        from chameleon.pipeline import run_ray_job  # noqa: PLC0415

        return run_ray_job(str(users_path), store, run_id, cfg, address=address, **(store_options or {}))
    from chameleon.local import run_local  # noqa: PLC0415

    return run_local(str(users_path), store, run_id, cfg, model_and_tokenizer=model_and_tokenizer, progress=progress)


def seed_partitions(store, src_run_id: str, dst_run_id: str, users_path: str | Path, cfg: ChameleonConfig) -> list[int]:
    """Copy the finished partitions of a committed run into a new, uncommitted run wherever the new
    run's partition holds exactly the same users with the same synthesis settings; the job then
    adopts them as resumed partitions instead of generating again. Returns the partitions copied.

    This extends an evaluation to more users (same tuning users first, more reported users after)
    at the cost of the new users only.
    """
    from chameleon.artifacts import RunReader, RunWriter  # noqa: PLC0415
    from chameleon.local import prepare_input  # noqa: PLC0415
    from chameleon.runs import part_keys, partition_users  # noqa: PLC0415

    reader = RunReader(store, src_run_id)
    src_cfg = reader.manifest.get("config", {})
    capture_keys = ("site", "candidate_layers", "layers")
    mismatch = [
        name for name, a, b in (
            ("synth", src_cfg.get("synth"), cfg.synth.model_dump()),
            ("model", src_cfg.get("model", {}).get("name_or_path"), cfg.model.name_or_path),
            ("users_per_partition", src_cfg.get("job", {}).get("users_per_partition"), cfg.job.users_per_partition),
            ("capture", {k: src_cfg.get("subspace", {}).get(k) for k in capture_keys},
             {k: getattr(cfg.subspace, k) for k in capture_keys}),
        ) if a != b
    ]
    if mismatch:
        raise ValueError(f"cannot reuse the synthesis of run {src_run_id}: different {', '.join(mismatch)}")
    if committed_manifest(store, dst_run_id) is not None:
        return []
    writer = RunWriter(store, dst_run_id)
    parts = partition_users(prepare_input(str(users_path), cfg).users, cfg.job.users_per_partition)
    copied = []
    for k in range(min(len(parts), int(reader.manifest["counts"]["partitions"]))):
        keys = part_keys(k)
        if writer.exists(keys["pairs"]):
            continue
        ids = set(reader.get_parquet(keys["profiles"]).column("user_id").to_pylist())
        ids |= {r["user_id"] for r in reader.get_jsonl(keys["failures"])}
        if ids != {u.user_id for u in parts[k]}:
            continue
        for name in ("profiles", "failures", "pairs"):  # pairs last: it marks the partition complete
            writer.run_store.put_bytes(keys[name], reader.get_bytes(keys[name]))
        copied.append(k)
    return copied


def read_run_tables(store, run_id: str, user_ids: Sequence[str] | None = None) -> tuple[pa.Table, pa.Table]:
    """(pairs, profiles) of a committed run's partitions, optionally only ``user_ids``' rows."""
    from chameleon.artifacts import RunReader  # noqa: PLC0415
    from chameleon.runs import part_keys  # noqa: PLC0415

    reader = RunReader(store, run_id)
    n = int(reader.manifest["counts"]["partitions"])
    pairs, profiles = [], []
    for k in range(n):
        keys = part_keys(k)
        pairs.append(reader.get_parquet(keys["pairs"]))
        profiles.append(reader.get_parquet(keys["profiles"]))
    pairs = [p for p in pairs if p.num_rows]
    profiles = [p for p in profiles if p.num_rows]
    if not pairs:
        raise RuntimeError(f"run {run_id} has no pairs")
    pt, qt = pa.concat_tables(pairs), pa.concat_tables(profiles)
    if user_ids is not None:
        wanted = pa.array(list(user_ids), pa.string())
        import pyarrow.compute as pc  # noqa: PLC0415

        pt = pt.filter(pc.is_in(pt.column("user_id"), value_set=wanted))
        qt = qt.filter(pc.is_in(qt.column("user_id"), value_set=wanted))
    return pt, qt


def derive_run(store, src_run_id: str, dst_run_id: str, cfg: ChameleonConfig, user_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """A new published run from another run's synthesis, without generating anything: the source's
    partitions (restricted to ``user_ids`` when given) are copied and reduced with ``cfg``'s
    subspace / group settings. Reuses ``dst_run_id`` when it is already committed.

    This is how the unseen-user setting gets groups built from tuning users only, and how a
    reduce configuration chosen on tuning users is applied to the stored pairs.
    """
    from chameleon.artifacts import ModelFingerprint, RunReader, RunWriter  # noqa: PLC0415
    from chameleon.runs import reduce_and_publish, write_partition  # noqa: PLC0415

    done = committed_manifest(store, dst_run_id)
    if done is not None:
        return done
    src = RunReader(store, src_run_id).manifest
    layers = list(src["captured_layers"])
    if cfg.subspace.site != src["site"]:
        raise ValueError(f"run {src_run_id} captured site {src['site']!r}; cannot derive a {cfg.subspace.site!r} run")
    pairs, profiles = read_run_tables(store, src_run_id, user_ids)
    writer = RunWriter(store, dst_run_id)
    write_partition(writer, 0, pairs, profiles, [])
    fp = ModelFingerprint.from_dict(src["model"]["fingerprint"])
    counts = {"records": profiles.num_rows, "accepted": profiles.num_rows, "rejected": 0, "partitions": 1,
              "partitions_resumed": 0, "derived_from": src_run_id}
    return reduce_and_publish(writer, cfg, layers, fp, src["model"]["id"], 1, counts, {})


def history_embeddings(profiles: pa.Table, user_ids: Sequence[str]) -> torch.Tensor:
    """[N, d] history embeddings (mean over a user's history items) of ``user_ids`` from a profiles table."""
    ids = profiles.column("user_id").to_pylist()
    emb = np.asarray(profiles.column("history_embedding").combine_chunks().flatten()).reshape(len(ids), -1)
    index = {u: i for i, u in enumerate(ids)}
    missing = [u for u in user_ids if u not in index]
    if missing:
        raise KeyError(f"no history embedding for users {missing[:5]}")
    return torch.from_numpy(emb[[index[u] for u in user_ids]].copy())


# =============================================================================================
# In-memory reduce (ablations): edits for any subspace / group configuration


@dataclass
class FittedEdits:
    """User and group edits of one reduce configuration."""

    user: dict[str, Edit | None]
    group_of: dict[str, str]
    group: dict[str, Edit]
    group_sizes: dict[str, int]
    group_ids: list[str] = field(default_factory=list)
    """Order of the rows of ``history_centroids``."""
    history_centroids: torch.Tensor | None = None
    """[G, d] mean history embedding of each group's members (the job's rule for unseen users)."""

    def for_users(self, user_ids: Sequence[str], level: str) -> list[Edit | None]:
        if level == "user":
            return [self.user.get(u) for u in user_ids]
        if level == "group":
            return [self.group[self.group_of[u]] if u in self.group_of else None for u in user_ids]
        raise ValueError(f"level must be 'user' or 'group', got {level!r}")

    def for_history(self, history_embedding: torch.Tensor) -> list[Edit]:
        """Group edits by the nearest history centroid, as the job assigns users it never saw."""
        from chameleon.subspace import nearest_group  # noqa: PLC0415

        idx, _ = nearest_group(history_embedding, self.history_centroids)
        return [self.group[self.group_ids[i]] for i in idx.tolist()]

    @property
    def mean_group_size(self) -> float:
        return float(np.mean(list(self.group_sizes.values()))) if self.group_sizes else 0.0


def fit_edits(pairs: pa.Table, profiles: pa.Table, layers: Sequence[int], cfg: ChameleonConfig) -> FittedEdits:
    """Reduce users, group them and reduce groups with ``cfg`` (the job's own stage functions)."""
    from chameleon.stages import group_users, reduce_groups, reduce_users, tables_to_units, unit_edit  # noqa: PLC0415

    layers = list(layers)
    data = tables_to_units(pairs, profiles, len(layers))
    red = reduce_users(data, cfg.subspace, layers)
    grouping = group_users(data, red, cfg)
    gsub, gchosen = reduce_groups(data, red, grouping, cfg.subspace, layers)
    site = cfg.subspace.site
    user = {
        u: (unit_edit(red.sub, i, red.chosen, layers, site) if bool(red.has_edit[i]) else None)
        for i, u in enumerate(data.user_ids)
    }
    group = {gid: unit_edit(gsub, j, gchosen, layers, site) for j, gid in enumerate(grouping.group_ids)}
    group_of = {u: grouping.group_ids[int(grouping.labels[i])] for i, u in enumerate(data.user_ids)}
    sizes = {gid: int(s) for gid, s in zip(grouping.group_ids, grouping.sizes, strict=True)}
    return FittedEdits(user, group_of, group, sizes, list(grouping.group_ids), grouping.history_centroids)


def recapture_pairs(model, tok, pairs: pa.Table, layers: Sequence[int], site: str, batch_size: int = 16) -> pa.Table:
    """The pairs table with ``emb_p`` / ``emb_n`` recaptured at another site, from the stored texts
    (the same "plain query + answer" texts the synthesis captured): no generation."""
    from chameleon.capture import capture  # noqa: PLC0415
    from chameleon.generation import chat_prompt  # noqa: PLC0415

    queries = pairs.column("query").to_pylist()
    texts = []
    for q, p, n in zip(queries, pairs.column("personalized").to_pylist(), pairs.column("neutral").to_pylist(), strict=True):
        prompt = chat_prompt(tok, q)
        texts += [prompt + p, prompt + n]
    hidden = capture(model, tok, texts, list(layers), site, batch_size=batch_size)
    width = hidden.shape[1] * hidden.shape[2]

    def col(x: torch.Tensor) -> pa.Array:
        flat = pa.array(x.reshape(-1).numpy().astype(np.float32), type=pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, width)

    out = pairs.drop_columns(["emb_p", "emb_n"])
    return out.append_column("emb_p", col(hidden[0::2])).append_column("emb_n", col(hidden[1::2]))


# =============================================================================================
# The evaluation


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
    generated again (see :func:`seed_partitions`)."""
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

    def stage(self, name: str):
        clock = self

        class _Ctx:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()
                log.info("stage %s ...", name)

            def __exit__(self, *exc):
                clock.wall[name] = clock.wall.get(name, 0.0) + time.perf_counter() - self.w
                clock.cpu[name] = clock.cpu.get(name, 0.0) + time.process_time() - self.c
                log.info("stage %s done in %.1f s", name, clock.wall[name])

        return _Ctx()

    def as_dict(self) -> dict[str, Any]:
        return {"wall_s": {k: round(v, 1) for k, v in self.wall.items()},
                "cpu_s": {k: round(v, 1) for k, v in self.cpu.items()},
                "total_wall_s": round(sum(self.wall.values()), 1)}


REDUCE_KEYS = ("subspace", "groups", "edit")


def _reduce_signature(cfg: ChameleonConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k).model_dump() for k in REDUCE_KEYS}


def _short(d: dict[str, Any]) -> str:
    return _key_hash(d)[:8]


class Evaluator:
    """State shared by the stages of one evaluation: data, model, store, cache, clock."""

    def __init__(self, settings: EvalSettings, cfg: ChameleonConfig, model_and_tokenizer=None, progress: bool = True) -> None:
        from chameleon.lamp import load_lamp7  # noqa: PLC0415
        from chameleon.storage import LocalStore, open_store  # noqa: PLC0415

        self.s = settings
        self.cfg = cfg
        self.progress = progress
        self.clock = _Clock()
        self.work = Path(settings.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.store = open_store(settings.store, **settings.store_options) if settings.store else LocalStore(self.work / "store")
        self.cache = PredictionCache(self.work / "predictions")
        questions, self.golds = load_lamp7(settings.lamp_dir)
        self.position = {q.id: i for i, q in enumerate(questions)}
        self.tuning, self.reported = select_users(questions, settings.tuning_users, settings.reported_users)
        self._mt = model_and_tokenizer

    # -- model -----------------------------------------------------------------------------
    @property
    def model_tok(self):
        if self._mt is None:
            from chameleon.model import load_model  # noqa: PLC0415

            self._mt = load_model(self.cfg.model)
        return self._mt

    def gen_key(self) -> dict[str, Any]:
        return {"model": self.cfg.model.name_or_path, "revision": self.cfg.model.revision,
                "max_new_tokens": self.s.max_new_tokens, "batch_size": self.s.batch_size}

    def _bar(self, name: str):
        if not self.progress:
            return None
        last = [0.0]

        def cb(done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last[0] > 30:
                last[0] = now
                log.info("  %s: %d/%d answers", name, done, total)

        return cb

    def answers(self, name: str, key: dict[str, Any], questions: Sequence[LampQuestion], messages: Sequence[str],
                edits: Sequence[Edit | None] | None = None, edit_cfg: EditConfig | None = None) -> list[str]:
        """Raw answers (cached by ``name`` + ``key`` + users)."""
        ids = [q.id for q in questions]
        full = {**self.gen_key(), **key, "name": name, "users": _key_hash({"ids": ids}), "messages": _key_hash({"m": list(messages)})}

        def produce() -> list[str]:
            if self.s.use_ray:
                from chameleon.pipeline import generate_answers_on_ray  # noqa: PLC0415

                return generate_answers_on_ray(self.cfg, list(messages), edits=None if edits is None else list(edits),
                                               edit_cfg=edit_cfg, max_new_tokens=self.s.max_new_tokens,
                                               batch_size=self.s.batch_size, address=self.s.address)
            model, tok = self.model_tok
            return generate_answers(model, tok, messages, edits=edits, edit_cfg=edit_cfg,
                                    max_new_tokens=self.s.max_new_tokens, batch_size=self.s.batch_size,
                                    progress=self._bar(name))

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
        sig = _short({"synth": self.cfg.synth.model_dump(), "subspace": self.cfg.subspace.model_dump(),
                      "model": self.cfg.model.name_or_path})
        return f"{self.s.run_tag}-t{t[0]}-{t[1]}-r{r[0]}-{r[1]}-{sig}"

    def ensure_synthesis(self) -> str:
        run_id = self.synth_run_id()
        users = self.tuning + self.reported
        path = write_users_jsonl(self.work / "users" / f"{run_id}.jsonl", users)
        reuse = self.s.reuse_synthesis_from
        if reuse and reuse != run_id and committed_manifest(self.store, reuse) is None:
            log.warning("run %s (to reuse) is not in %s; synthesizing every user", reuse, self.store.uri)
        elif reuse and reuse != run_id:
            copied = seed_partitions(self.store, reuse, run_id, path, self.cfg)
            log.info("reused %d partitions of run %s", len(copied), reuse)
        with self.clock.stage("synthesis"):
            model_tok = None if self.s.use_ray else self.model_tok
            run_synthesis(path, self.store, run_id, self.cfg, model_and_tokenizer=model_tok,
                          use_ray=self.s.use_ray, address=self.s.address, progress=self.progress,
                          store_options=self.s.store_options)
        return run_id

    def derived(self, src: str, name: str, cfg: ChameleonConfig, user_ids: Sequence[str] | None) -> str:
        run_id = f"{src}-{name}-{_short(_reduce_signature(cfg))}"
        with self.clock.stage("reduce"):
            derive_run(self.store, src, run_id, cfg, user_ids)
        return run_id


def _postprocess(raw: Sequence[str]) -> list[str]:
    return [metrics.first_answer_line(x) for x in raw]


def _run_cfg(cfg: ChameleonConfig, group_size: Any, n_users: int) -> ChameleonConfig:
    return cfg if group_size is None else cfg.with_overrides(_group_overrides(group_size, n_users))


def _main_methods(ev: Evaluator, synth_run: str | None, cfg: ChameleonConfig,
                  methods: Sequence[str] = METHODS, group_size: Any = None,
                  ) -> tuple[dict[str, list[str]], dict[str, list[Any]], dict[str, Any]]:
    """Raw answers of each method on the reported users; also per-user group ids and run ids.

    ``group_size`` (users per group, or "all") overrides the group count of each run it builds."""
    from chameleon.artifacts import RunReader  # noqa: PLC0415
    from chameleon.runs import PublishedRun  # noqa: PLC0415

    qs = ev.reported
    ids = [q.id for q in qs]
    raw: dict[str, list[str]] = {}
    groups: dict[str, list[Any]] = {}
    info: dict[str, Any] = {}
    edit_key = cfg.edit.model_dump()
    if "copy" in methods:
        raw["copy"] = [copy_answer(q.input) for q in qs]
    if "base" in methods:
        raw["base"] = ev.answers("base", {}, qs, [q.input for q in qs])
    if "rag" in methods:
        raw["rag"] = ev.answers("rag", {"k": ev.s.rag_k}, qs, [rag_prompt(q, ev.s.rag_k) for q in qs])
    need_all = any(m in methods for m in ("chameleon_user", "chameleon_group"))
    if need_all:
        all_cfg = _run_cfg(cfg, group_size, len(ev.tuning) + len(ev.reported))
        # The synthesis run's own reduce is used when it was published with exactly this setting.
        published = (committed_manifest(ev.store, synth_run) or {}).get("config", {})
        same = _reduce_signature(all_cfg) == {k: published.get(k) for k in REDUCE_KEYS}
        all_run = synth_run if same else ev.derived(synth_run, "all", all_cfg, None)
        info["run_all"] = all_run
        run = PublishedRun(RunReader(ev.store, all_run))
        if "chameleon_user" in methods:
            edits = [run.user_edit(u) for u in ids]
            info["users_without_own_edit"] = sum(e is None for e in edits)
            raw["chameleon_user"] = ev.answers("chameleon_user", {"run": all_run, "edit": edit_key}, qs,
                                                         [q.input for q in qs], edits, cfg.edit)
        if "chameleon_group" in methods:
            gids = [run.user_group(u) for u in ids]
            cache: dict[str, Edit] = {}
            edits = [cache.setdefault(g, run.group_edit(g)) for g in gids]
            groups["chameleon_group"] = gids
            info["groups_all"] = {g["group_id"]: g["n_users"] for g in run.manifest["groups"]}
            raw["chameleon_group"] = ev.answers("chameleon_group", {"run": all_run, "edit": edit_key}, qs,
                                                          [q.input for q in qs], edits, cfg.edit)
    if "chameleon_unseen" in methods:
        tuning_ids = [q.id for q in ev.tuning]
        t_run = ev.derived(synth_run, "tuning", _run_cfg(cfg, group_size, len(tuning_ids)), tuning_ids)
        info["run_tuning"] = t_run
        run_t = PublishedRun(RunReader(ev.store, t_run))
        _, profiles = read_run_tables(ev.store, synth_run, ids)
        gids, dist = run_t.assign_unseen(history_embeddings(profiles, ids))
        cache = {}
        edits = [cache.setdefault(g, run_t.group_edit(g)) for g in gids]
        groups["chameleon_unseen"] = gids
        info["groups_tuning"] = {g["group_id"]: g["n_users"] for g in run_t.manifest["groups"]}
        raw["chameleon_unseen"] = ev.answers("chameleon_unseen", {"run": t_run, "edit": edit_key}, qs,
                                                       [q.input for q in qs], edits, cfg.edit)
    return raw, groups, info


def _cfg_summary(cfg: ChameleonConfig) -> dict[str, Any]:
    return {
        "synth": {k: getattr(cfg.synth, k) for k in ("pairs_per_user", "history_k", "insight_max_new_tokens",
                                                     "answer_max_new_tokens", "temperature", "batch_size")},
        "subspace": {k: getattr(cfg.subspace, k) for k in ("site", "n_layers", "theta_p", "theta_n", "max_rank")},
        "groups": {k: getattr(cfg.groups, k) for k in ("n_groups", "min_group_size")},
        "edit": cfg.edit.model_dump(),
    }


def run_evaluation(settings: EvalSettings, cfg: ChameleonConfig, *, model_and_tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """The whole evaluation: synthesis over tuning + reported users, ablations (tuning users) when
    asked, the methods on the reported users, scores, results.json, predictions.parquet, report.

    Returns the results dict (also written to ``<out_dir>/results.json``).
    """
    ev = Evaluator(settings, cfg, model_and_tokenizer, progress)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model_methods = [m for m in settings.methods if m in MODEL_METHODS and m.startswith("chameleon")]
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
    tuned = group_size is not None or _reduce_signature(final_cfg) != _reduce_signature(cfg)
    if tuned:
        # `chameleon_*` = the setting chosen on tuning users; the default's answers become `*_default`.
        chameleon = [m for m in settings.methods if m.startswith("chameleon")]
        raw_t, groups_t, info_t = _main_methods(ev, synth_run, final_cfg, methods=chameleon, group_size=group_size)
        for m in chameleon:
            raw[m + "_default"] = raw.pop(m)
            if m in groups:
                groups[m + "_default"] = groups.pop(m)
        info = {**{f"{k}_default": v for k, v in info.items()}, **info_t}
        raw.update(raw_t)
        groups.update(groups_t)

    with ev.clock.stage("score"):
        preds = {m: _postprocess(r) for m, r in raw.items()}
        golds = [ev.golds[q.id] for q in ev.reported]
        scores = score_methods(preds, golds, n_resamples=settings.n_resamples, seed=settings.seed)
    order = [m for m in METHODS if m in scores] + sorted(m for m in scores if m not in METHODS)
    results = {
        "model": cfg.model.name_or_path,
        "n_users": len(ev.reported),
        "task": "LaMP_7 (dev, user-based split)",
        "users": {
            "reported_positions": list(settings.reported_users),
            "tuning_positions": list(settings.tuning_users),
            "reported_ids": [ev.reported[0].id, ev.reported[-1].id],
        },
        "methods": {m: _strip_per_user(scores)[m] for m in order},
        "goal": goal_verdict(scores),
        "config": {"final": _cfg_summary(final_cfg), "default": _cfg_summary(cfg),
                   "final_group_size": group_size,
                   "selected_on_tuning": bool(tuned),
                   "selected": (ablations or {}).get("selected") if settings.select_on_tuning else None},
        "generation": {"decoding": "greedy", "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size,
                       "postprocess": "metrics.first_answer_line", "rag_k": settings.rag_k,
                       "prompt": "chat template, one user message (the LaMP input; RAG: LaMP-7 retrieval prompt)"},
        "scoring": {"metric": "rouge_score 0.1.2 rouge1/rougeL F-measure, no stemming, mean over users",
                    "bootstrap": {"n_resamples": settings.n_resamples, "seed": settings.seed, "ci": 0.95}},
        "runs": {"synthesis": synth_run, **info},
        "timings": {**ev.clock.as_dict(), "wall_s_this_invocation": round(time.perf_counter() - t_start, 1)},
        "command": settings.command,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_predictions(out / "predictions.parquet", ev, raw, preds, scores, groups)
    write_report(out)
    return results


def _write_predictions(path: Path, ev: Evaluator, raw, preds, scores, groups) -> None:
    rows: dict[str, list] = {k: [] for k in ("user_id", "position", "method", "input", "gold", "raw", "prediction",
                                              "rouge1", "rougeL", "group_id")}
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


# =============================================================================================
# Ablations (tuning users only)


@dataclass
class _Point:
    ablation: str
    value: Any
    level: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _ablation_grid(names: Sequence[str]) -> list[_Point]:
    pts: list[_Point] = [_Point("default", "default", "group"), _Point("default", "default", "user")]
    if "alpha" in names:
        pts += [_Point("alpha", a, "group", {"edit.alpha": a}) for a in (0.5, 2.0, 4.0)]
    if "beta" in names:
        pts += [_Point("beta", b, "group", {"edit.beta": b}) for b in (0.0, 2.0)]
    if "n_layers" in names:
        pts += [_Point("n_layers", n, "group", {"subspace.n_layers": n}) for n in (1, 5)]
    if "theta_p" in names:
        pts += [_Point("theta_p", m, "group", {"subspace.theta_p": m}) for m in ("mean_diff",)]
    if "theta_n" in names:
        pts += [_Point("theta_n", "mean_diff", "group", {"subspace.theta_n": "mean_diff"})]
    if "site" in names:
        pts += [_Point("site", "residual", "group", {"subspace.site": "residual"})]
    if "positions" in names:
        # Which token positions get the edit is open in the method (the lab's hooks edit the last
        # position of each call); editing every prompt position is a stronger edit, so weaker α too.
        pts += [_Point("positions", f"all, α=β={a:g}", "group", {"edit.positions": "all", "edit.alpha": a, "edit.beta": a},
                       note="every position edited") for a in (1.0, 0.5, 0.25)]
    if "group_size" in names:
        pts += [_Point("group_size", s, "group", {}, note="target users per group") for s in (5, 50, "all")]
    return pts


def _group_overrides(target: Any, n_users: int) -> dict[str, Any]:
    if target == "all":
        return {"groups.n_groups": 1, "groups.min_group_size": 1}
    k = max(1, round(n_users / int(target)))
    return {"groups.n_groups": k, "groups.min_group_size": max(1, int(target) // 2)}


def run_ablations(ev: Evaluator, synth_run: str) -> dict[str, Any]:
    """One-factor-at-a-time ablations on tuning users (never on reported users).

    Edits come from the tuning users' stored pairs (reduced in memory with each setting; groups
    are built from tuning users only), and the tuning users' own LaMP questions are scored. The
    history-size ablation runs a fresh synthesis of ``history_users`` per history size.
    """
    s = ev.s
    tuning_ids = [q.id for q in ev.tuning]
    eval_qs = ev.tuning if s.ablation_users is None else _slice_tuning(ev, s.ablation_users)
    eval_ids = [q.id for q in eval_qs]
    golds = [ev.golds[i] for i in eval_ids]
    messages = [q.input for q in eval_qs]
    with ev.clock.stage("ablation:read"):
        pairs, profiles = read_run_tables(ev.store, synth_run, tuning_ids)
        layers = _manifest_layers(ev, synth_run)
    base_raw = ev.answers("base", {}, eval_qs, messages)
    preds: dict[str, list[str]] = {"copy": [copy_answer(q.input) for q in eval_qs], "base": _postprocess(base_raw)}
    if "rag" in s.methods:
        preds["rag"] = _postprocess(ev.answers("rag", {"k": s.rag_k}, eval_qs, [rag_prompt(q, s.rag_k) for q in eval_qs]))
    points_meta: list[dict[str, Any]] = []
    fits: dict[str, FittedEdits] = {}
    recaptured: dict[str, pa.Table] = {}
    for pt in _ablation_grid(s.ablations):
        overrides = dict(pt.overrides)
        if pt.ablation == "group_size":
            overrides.update(_group_overrides(pt.value, len(tuning_ids)))
        cfg = ev.cfg.with_overrides(overrides)
        label = f"{pt.ablation}={pt.value}/{pt.level}"
        sig = _fit_signature(cfg)
        if sig not in fits:
            with ev.clock.stage("ablation:reduce"):
                tbl = pairs
                if cfg.subspace.site != ev.cfg.subspace.site:
                    if cfg.subspace.site not in recaptured:
                        model, tok = ev.model_tok
                        with ev.clock.stage("ablation:recapture"):
                            recaptured[cfg.subspace.site] = recapture_pairs(model, tok, pairs, layers, cfg.subspace.site, ev.cfg.synth.batch_size)
                    tbl = recaptured[cfg.subspace.site]
                fits[sig] = fit_edits(tbl, profiles, layers, cfg)
        fit = fits[sig]
        edits = fit.for_users(eval_ids, pt.level)
        key = {"run": synth_run, "users_fit": _key_hash({"ids": tuning_ids}), "fit": sig, "level": pt.level,
               "edit": cfg.edit.model_dump()}
        raw = ev.answers(f"ablation-{pt.ablation}", key, eval_qs, messages, edits, cfg.edit)
        preds[label] = _postprocess(raw)
        points_meta.append({"label": label, "ablation": pt.ablation, "value": pt.value, "level": pt.level,
                            "overrides": overrides, "mean_group_size": 1.0 if pt.level == "user" else fit.mean_group_size,
                            "n_groups": len(fit.group), "users_without_own_edit": sum(e is None for e in fit.for_users(eval_ids, "user")),
                            "alpha": cfg.edit.alpha, "beta": cfg.edit.beta, "note": pt.note})
    if "unseen" in s.ablations:
        default_fit = fits[_fit_signature(ev.cfg)]  # the grid's first point is always the default
        for meta, raw in _unseen_points(ev, synth_run, pairs, profiles, layers, default_fit, eval_qs, messages):
            preds[meta["label"]] = _postprocess(raw)
            points_meta.append(meta)
    with ev.clock.stage("ablation:score"):
        scores = score_methods(preds, golds, n_resamples=s.n_resamples, seed=s.seed)
    points = []
    for meta in points_meta:
        sc = scores[meta["label"]]
        points.append({**meta, **{k: v for k, v in sc.items() if k != "per_user"}})
    history = _history_ablation(ev, synth_run) if "history" in s.ablations else None
    selected = _select(points, scores)
    return {
        "model": ev.cfg.model.name_or_path,
        "users": {"fit_positions": list(s.tuning_users),
                  "scored_positions": list(s.ablation_users or s.tuning_users), "n_scored": len(eval_ids),
                  "history_positions": list(s.history_users)},
        "reference": {m: {k: v for k, v in scores[m].items() if k != "per_user"} for m in ("copy", "base", "rag") if m in scores},
        "points": points,
        "history": history,
        "selected": selected,
        "default": _cfg_summary(ev.cfg),
    }


def _fit_signature(cfg: ChameleonConfig) -> str:
    """What an in-memory fit depends on (the edit settings apply later)."""
    return _short({"subspace": cfg.subspace.model_dump(), "groups": cfg.groups.model_dump()})


def _rows_of(table: pa.Table, user_ids: Sequence[str]) -> pa.Table:
    import pyarrow.compute as pc  # noqa: PLC0415

    return table.filter(pc.is_in(table.column("user_id"), value_set=pa.array(list(user_ids))))


def _unseen_points(ev: Evaluator, synth_run: str, pairs: pa.Table, profiles: pa.Table, layers: Sequence[int],
                   full: FittedEdits, eval_qs: Sequence[LampQuestion], messages: Sequence[str],
                   ) -> list[tuple[dict[str, Any], list[str]]]:
    """The unseen-user setting inside the tuning users, and what of it is the assignment rule.

    ``unseen=2-fold``: the tuning users are split in two halves by file position; each half gets
    the group edits fitted on the other half only (group count scaled to keep the default group
    size), assigned from history alone, the job's rule for users it never saw.
    ``assignment=history``: the default fit on all tuning users, but each user takes the group of
    the nearest history centroid instead of its own cluster: the same rule on users that were seen.
    ``full`` is that default fit on all tuning users.
    """
    cfg = ev.cfg
    tuning_ids = [q.id for q in ev.tuning]
    eval_ids = [q.id for q in eval_qs]
    hist = history_embeddings(profiles, eval_ids)
    common = {"overrides": {}, "alpha": cfg.edit.alpha, "beta": cfg.edit.beta, "users_without_own_edit": 0}
    out = []
    key = {"run": synth_run, "users_fit": _key_hash({"ids": tuning_ids}), "fit": _short(_reduce_signature(cfg)),
           "assign": "history", "edit": cfg.edit.model_dump()}
    raw = ev.answers("ablation-assignment", key, eval_qs, messages, full.for_history(hist), cfg.edit)
    out.append(({"label": "assignment=history/group", "ablation": "assignment", "value": "history", "level": "group",
                 "mean_group_size": full.mean_group_size, "n_groups": len(full.group),
                 "note": "own cluster replaced by the nearest history centroid", **common}, raw))

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
            fit = fit_edits(_rows_of(pairs, other), _rows_of(profiles, other), layers, fold_cfg)
        sizes.append(fit.mean_group_size)
        members = set(fold)
        in_fold = [i for i, u in enumerate(eval_ids) if u in members]
        for i, e in zip(in_fold, fit.for_history(hist[in_fold]), strict=True):
            edits[i] = e
    key = {"run": synth_run, "folds": _key_hash({"f": folds}), "fit": _short(_reduce_signature(fold_cfg)), "edit": cfg.edit.model_dump()}
    raw = ev.answers("ablation-unseen", key, eval_qs, messages, edits, cfg.edit)
    out.append(({"label": "unseen=2-fold/unseen", "ablation": "unseen", "value": "2-fold", "level": "unseen",
                 "mean_group_size": float(np.mean(sizes)) if sizes else 0.0, "n_groups": n_groups,
                 "note": "groups fitted on the other half of the tuning users, assigned from history", **common}, raw))
    return out


def _slice_tuning(ev: Evaluator, rng: tuple[int, int]) -> list[LampQuestion]:
    start, stop = rng
    t0, t1 = ev.s.tuning_users
    if start < t0 or stop > t1:
        raise ValueError(f"ablation users {start}:{stop} must lie inside the tuning users {t0}:{t1}")
    return ev.tuning[start - t0 : stop - t0]


def _manifest_layers(ev: Evaluator, run_id: str) -> list[int]:
    m = committed_manifest(ev.store, run_id)
    return list(m["captured_layers"])


def _select(points: list[dict[str, Any]], scores: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The group-level setting with the best tuning ROUGE-L among the ablation points whose settings
    can be applied to the stored pairs of the reported run (site changes cannot) by a config
    override (the history-assignment diagnostic is none), if it beats the
    default group edit; else None (keep the default)."""
    # Site changes need other stored states; the assignment point is a diagnostic, not a setting.
    eligible = [p for p in points if p["level"] == "group" and p["ablation"] not in ("site", "assignment")]
    if not eligible:
        return None
    default = next((p for p in eligible if p["ablation"] == "default"), None)
    best = max(eligible, key=lambda p: (p["rougeL"], p["ablation"] == "default"))
    if default is None or best is default or best["rougeL"] <= default["rougeL"]:
        return {"label": "default", "overrides": {}, "group_size": None, "rougeL_tuning": None if default is None else default["rougeL"],
                "rule": "best tuning ROUGE-L among group-level ablation points; default kept"}
    overrides = dict(best["overrides"])
    group_size = None
    if best["ablation"] == "group_size":
        # A number of users per group: the group count is rescaled to each run it is applied to.
        overrides, group_size = {}, best["value"]
    return {"label": best["label"], "overrides": overrides, "group_size": group_size, "rougeL_tuning": best["rougeL"],
            "default_rougeL_tuning": default["rougeL"],
            "rule": "best tuning ROUGE-L among group-level ablation points (site and assignment excluded)"}


def _history_ablation(ev: Evaluator, synth_run: str) -> dict[str, Any]:
    """History size (1, 3, 5, all items) on a few tuning users: one synthesis per size (the main
    synthesis is reused for the configured size). Edits and groups come from these users only."""
    s = ev.s
    qs = _slice_tuning(ev, s.history_users)
    ids = [q.id for q in qs]
    golds = [ev.golds[i] for i in ids]
    messages = [q.input for q in qs]
    preds = {"copy": [copy_answer(q.input) for q in qs], "base": _postprocess(ev.answers("base", {}, qs, messages))}
    meta = []
    n_groups = max(1, len(ids) // 5)
    for k in (1, 3, 5, "all"):
        hk = 512 if k == "all" else int(k)
        cfg = ev.cfg.with_overrides({"synth.history_k": hk, "groups.n_groups": n_groups,
                                     "groups.min_group_size": 3})
        run_id = f"{s.run_tag}-hist-{s.history_users[0]}-{s.history_users[1]}-k{k}-" + _short(
            {"synth": cfg.synth.model_dump(), "subspace": cfg.subspace.model_dump(), "model": cfg.model.name_or_path})
        if hk == ev.cfg.synth.history_k:
            run_id = synth_run
            pairs, profiles = read_run_tables(ev.store, run_id, ids)
        else:
            path = write_users_jsonl(ev.work / "users" / f"{run_id}.jsonl", qs)
            with ev.clock.stage("ablation:history-synthesis"):
                run_synthesis(path, ev.store, run_id, cfg, model_and_tokenizer=ev.model_tok, progress=ev.progress)
            pairs, profiles = read_run_tables(ev.store, run_id)
        layers = _manifest_layers(ev, run_id)
        with ev.clock.stage("ablation:reduce"):
            fit = fit_edits(pairs, profiles, layers, cfg)
        for level in ("user", "group"):
            label = f"history={k}/{level}"
            key = {"run": run_id, "level": level, "edit": cfg.edit.model_dump(),
                   "fit": _fit_signature(cfg)}
            raw = ev.answers("ablation-history", key, qs, messages, fit.for_users(ids, level), cfg.edit)
            preds[label] = _postprocess(raw)
            meta.append({"label": label, "history_k": k, "level": level, "run": run_id,
                         "mean_group_size": 1.0 if level == "user" else fit.mean_group_size})
    scores = score_methods(preds, golds, n_resamples=s.n_resamples, seed=s.seed)
    return {
        "users": [ev.position[ids[0]], ev.position[ids[-1]] + 1],
        "n_users": len(ids),
        "reference": {m: {k: v for k, v in scores[m].items() if k != "per_user"} for m in ("copy", "base")},
        "points": [{**m, **{k: v for k, v in scores[m["label"]].items() if k != "per_user"}} for m in meta],
    }


# =============================================================================================
# Report


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


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(rel: float | None) -> str:
    return "n/a (base scores 0)" if rel is None else f"{rel * 100:+.1f} %"


def _fmt_ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt_cmp(c: dict[str, Any] | None, signed: bool = True) -> str:
    if not c:
        return ""
    rel = "" if c.get("rel") is None else f" ({c['rel'] * 100:+.1f} %)"
    return f"{c['diff']:+.3f} {_fmt_ci(c['diff_ci95'])}{rel}, p={c['p_bootstrap']:.3f}"


def _plot_methods(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    methods = _display_order(list(results["methods"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, metric in zip(axes, ("rouge1", "rougeL"), strict=True):
        means = [results["methods"][m][metric] for m in methods]
        cis = [results["methods"][m][f"{metric}_ci95"] for m in methods]
        err = np.array([[mu - c[0] for mu, c in zip(means, cis, strict=True)], [c[1] - mu for mu, c in zip(means, cis, strict=True)]])
        colors = ["#999999" if m == "copy" else "#4c72b0" if m in ("base", "rag") else "#dd8452" for m in methods]
        ax.bar(range(len(methods)), means, yerr=err, capsize=3, color=colors)
        if "copy" in results["methods"]:
            ax.axhline(results["methods"]["copy"][metric], color="#555555", ls="--", lw=1, label="copy (sanity line)")
        if "base" in results["methods"]:
            ax.axhline(results["methods"]["base"][metric] * (1 + GOAL_REL_ROUGE_L), color="#c44e52", ls=":", lw=1,
                       label="base +15 % (goal)")
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("mean over users (95 % bootstrap CI)")
    fig.suptitle(f"LaMP-7, {results['n_users']} reported users, {results['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_xy(series: dict[str, list[tuple[float, float, float, float]]], refs: dict[str, float], xlabel: str, title: str,
             path: Path, logx: bool = False, xticks: list[tuple[float, str]] | None = None) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

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
        _plot_xy({"Chameleon (group edit; 1 = own edit)": series}, refs, "users pooled per group (mean group size)",
                 f"ROUGE-L vs group size ({n} tuning users)", out / "metric_vs_group_size.png", logx=True)
        drawn.append(("metric_vs_group_size.png", "ROUGE-L vs number of users pooled per group (tuning users)."))
    alpha_pts = [p for p in pts if p["ablation"] == "alpha"]
    if alpha_pts:
        series = [_pt(p, float(p["value"])) for p in alpha_pts]
        if default_g:
            series.append(_pt(default_g, float(default_g["alpha"])))
        _plot_xy({"Chameleon group edit (β = 1)": series}, refs, "α (scale of the added personalized component)",
                 f"ROUGE-L vs α ({n} tuning users)", out / "metric_vs_alpha.png")
        drawn.append(("metric_vs_alpha.png", "ROUGE-L vs edit strength α (tuning users)."))
    hist = ab.get("history")
    if hist:
        xs = {1: 1, 3: 3, 5: 5, "all": 8}
        series: dict[str, list] = {}
        for p in hist["points"]:
            series.setdefault(f"Chameleon, {p['level']} edit", []).append(_pt(p, xs[p["history_k"]]))
        href = {m: hist["reference"][m]["rougeL"] for m in hist["reference"]}
        _plot_xy(series, href, "history items per user (k)", f"ROUGE-L vs history size ({hist['n_users']} tuning users)",
                 out / "metric_vs_history_size.png", xticks=[(1, "1"), (3, "3"), (5, "5"), (8, "all")])
        drawn.append(("metric_vs_history_size.png", "ROUGE-L vs number of history items per user (tuning users)."))
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
    L.append(f"Reported users: **{res['n_users']}** (file positions {u['reported_positions'][0]}..{u['reported_positions'][1] - 1}, "
             f"never used for tuning). Tuning users: positions {u['tuning_positions'][0]}..{u['tuning_positions'][1] - 1}.\n")
    g = res.get("goal", {})
    if g.get("evaluated"):
        verdict = "**met**" if g["met"] else "**not met**"
        L.append(
            f"**Goal** (Chameleon group edit ≥ base + {g['target_rel_vs_base'] * 100:.0f} % relative ROUGE-L and above RAG, paired test): {verdict}. "
            f"Group edit vs base: {_pct(g['rel_vs_base'])} ROUGE-L (difference 95 % CI {_fmt_ci(g['diff_vs_base_ci95'])}, "
            f"p = {g['p_vs_base']:.3f}); vs RAG: {g['diff_vs_rag']:+.3f} (95 % CI {_fmt_ci(g['diff_vs_rag_ci95'])}, p = {g['p_vs_rag']:.3f}).\n"
            if g.get("diff_vs_rag") is not None else
            f"**Goal**: {verdict} (group edit vs base {_pct(g['rel_vs_base'])} ROUGE-L; RAG not evaluated).\n")
    L.append("## Results on reported users\n")
    L.append("| method | ROUGE-1 [95 % CI] | ROUGE-L [95 % CI] | ROUGE-L vs base (diff [CI], rel, p) | ROUGE-L vs RAG | gap to copy (ROUGE-L) |")
    L.append("|---|---|---|---|---|---|")
    for m in _display_order(list(M)):
        e = M[m]
        name = _label(m)
        vb = _fmt_cmp(e.get("vs_base", {}).get("rougeL"))
        vr = _fmt_cmp(e.get("vs_rag", {}).get("rougeL"))
        gap = e.get("vs_copy", {}).get("rougeL")
        gap_s = "" if not gap else f"{gap['diff']:+.3f} {_fmt_ci(gap['diff_ci95'])}"
        L.append(f"| `{m}` {name} | {e['rouge1']:.3f} {_fmt_ci(e['rouge1_ci95'])} | {e['rougeL']:.3f} {_fmt_ci(e['rougeL_ci95'])} | {vb} | {vr} | {gap_s} |")
    L.append("")
    L.append(f"Paired comparisons resample users jointly for both methods ({res['scoring']['bootstrap']['n_resamples']:,} bootstrap "
             "resamples); p is the two-sided "
             "bootstrap p-value of that one comparison, not corrected for the number of comparisons in the table. "
             "ROUGE-1 comparisons and exact sign tests are in `results.json`. `copy` answers with "
             "the tweet inside the LaMP input and uses no model: on this task it is the sanity line every method should "
             "be read against (the gap column: negative = below copy).\n")
    L.append("![metric by method](metric_by_method.png)\n")
    cfg = res["config"]
    L.append("## Setup\n")
    gen = res["generation"]
    L.append(f"- Decoding: {gen['decoding']}, max {gen['max_new_tokens']} new tokens, batch {gen['batch_size']}, {gen['prompt']}; "
             f"answer = first non-empty line (a preamble line ending in ':' skipped). RAG k = {gen['rag_k']}.")
    L.append(f"- Scoring: {res['scoring']['metric']}; 95 % percentile bootstrap over users.")
    fin = cfg["final"]
    L.append(f"- Chameleon synthesis: {fin['synth']}.")
    groups_s = (f"one group per about {cfg['final_group_size']} users (group count scaled to each run)"
                if cfg.get("final_group_size") not in (None, "all") else
                "all users in one group" if cfg.get("final_group_size") == "all" else str(fin["groups"]))
    L.append(f"- Chameleon reduce/edit used for `chameleon_*`: subspace {fin['subspace']}, groups: {groups_s}, edit {fin['edit']}.")
    if cfg.get("selected_on_tuning"):
        sel = cfg["selected"] or {}
        L.append(f"- That reduce/edit setting was **selected on tuning users** (ablations below): `{sel.get('label')}`, overrides "
                 f"{sel.get('overrides')}, users per group {sel.get('group_size')}. "
                 "Methods suffixed `_default` use the default setting " + f"({cfg['default']['subspace']}, {cfg['default']['edit']}).")
    runs = res.get("runs", {})
    for key in ("groups_all", "groups_tuning"):
        if key in runs:
            sizes = sorted(runs[key].values(), reverse=True)
            what = "tuning + reported users" if key == "groups_all" else "tuning users only (unseen setting)"
            L.append(f"- Groups from {what}: {len(sizes)} groups, sizes {sizes}.")
    if "users_without_own_edit" in runs:
        L.append(f"- Reported users without an own edit (too few pairs kept; they get the base model in `chameleon_user`): {runs['users_without_own_edit']}.")
    t = res["timings"]
    total = t.get("wall_s_this_invocation", t["total_wall_s"])
    L.append(f"- Wall time of this invocation (2 shared CPU cores; work found in the store or the prediction cache is not "
             f"redone and not counted): {total / 60:.1f} min; per stage (s, cumulative; ablation stages nest): "
             + ", ".join(f"{k} {v:.0f}" for k, v in t["wall_s"].items()) + ". CPU seconds per stage are in `results.json`.")
    L.append(f"- Runs in the store: {', '.join(f'{k}=`{v}`' for k, v in runs.items() if isinstance(v, str))}.\n")
    if ab:
        L += _ablation_section(ab, out)
    disc = out / "discussion.md"
    if disc.is_file():
        L.append(disc.read_text().strip() + "\n")
    if res.get("command"):
        L.append("## Reproduce\n")
        L.append("```\n" + res["command"] + "\n```\n")
    L.append("Files: `results.json` (all figures, paired tests, timings), `predictions.parquet` (per user and method: input, "
             "gold, raw answer, scored answer, ROUGE-1/L, group)" + (", `ablations.json`" if ab else "") + ".\n")
    path = out / "report.md"
    path.write_text("\n".join(L))
    return path


def _ablation_section(ab: dict[str, Any], out: Path) -> list[str]:
    L = ["## Ablations (tuning users only)\n"]
    us = ab["users"]
    L.append(f"Edits fitted on tuning users {us['fit_positions'][0]}..{us['fit_positions'][1] - 1} (groups from tuning users only), "
             f"scored on {us['n_scored']} tuning users' own LaMP questions. One factor at a time from the default "
             "(group edit unless stated). These are tuning decisions; no reported user is involved.\n")
    ref = ab["reference"]
    L.append("| setting | level | mean group size | ROUGE-1 [CI] | ROUGE-L [CI] | ROUGE-L vs base (diff [CI], rel, p) |")
    L.append("|---|---|---|---|---|---|")
    for m in ("copy", "base", "rag"):
        if m in ref:
            e = ref[m]
            L.append(f"| `{m}` | — | — | {e['rouge1']:.3f} {_fmt_ci(e['rouge1_ci95'])} | {e['rougeL']:.3f} {_fmt_ci(e['rougeL_ci95'])} | |")
    for p in ab["points"]:
        L.append(f"| {p['ablation']} = {p['value']} | {p['level']} | {p['mean_group_size']:.1f} | {p['rouge1']:.3f} {_fmt_ci(p['rouge1_ci95'])} | "
                 f"{p['rougeL']:.3f} {_fmt_ci(p['rougeL_ci95'])} | {_fmt_cmp(p.get('vs_base', {}).get('rougeL'))} |")
    L.append("")
    hist = ab.get("history")
    if hist:
        L.append(f"History size (own synthesis per size, tuning users {hist['users'][0]}..{hist['users'][1] - 1}, {hist['n_users']} users; "
                 f"groups of about 5 among them):\n")
        L.append("| history items | level | ROUGE-L [CI] | vs base |")
        L.append("|---|---|---|---|")
        for m in ("copy", "base"):
            e = hist["reference"][m]
            L.append(f"| `{m}` | — | {e['rougeL']:.3f} {_fmt_ci(e['rougeL_ci95'])} | |")
        for p in hist["points"]:
            L.append(f"| {p['history_k']} | {p['level']} | {p['rougeL']:.3f} {_fmt_ci(p['rougeL_ci95'])} | {_fmt_cmp(p.get('vs_base', {}).get('rougeL'))} |")
        L.append("")
    for fname, caption in _ablation_plots(ab, out):
        L.append(f"![{caption}]({fname})\n")
        L.append(f"*{caption}*\n")
    sel = ab.get("selected")
    if sel:
        L.append(f"Selection rule: {sel['rule']}. Selected: `{sel['label']}` (overrides {sel['overrides']}).\n")
    return L
