"""The evaluation's runs: the synthesis job, runs derived from its pairs, and in-memory reduces.

The synthesis (fake it) runs once over tuning + reported users, as one job (in-process, or the Ray
job's map stage); its partitions hold the pairs and hidden states, so every reduce-side variant
(θP/θN method, number of layers, group size, α/β) re-reduces them without generating again:
:func:`derive_run` publishes such a variant as a run of its own, :func:`fit_edits` keeps it in
memory (ablations). Both reduce with the job's own :func:`chameleon.job.reduce.reduce_all`.

Ray is used only when asked for (through `chameleon.job.drivers`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from chameleon.config import ChameleonConfig
from chameleon.core.edit import Edit
from chameleon.core.generation import chat_prompt
from chameleon.core.subspace import nearest_group
from chameleon.core.synth import capture_answers
from chameleon.data.artifacts import RunReader, RunWriter, committed_manifest
from chameleon.data.inputs import prepare_input
from chameleon.data.layout import column_matrix, filter_users, part_keys, read_partitions, vector_column
from chameleon.data.manifest import RunManifest
from chameleon.data.storage import Store
from chameleon.evaluation.cache import key_hash
from chameleon.evaluation.lamp import LampQuestion, lamp_to_user_records
from chameleon.job.drivers import run_job
from chameleon.job.publish import Calibrate, reduce_and_publish
from chameleon.job.reduce import reduce_all
from chameleon.job.run import partition_users, read_done_record, write_partition

log = logging.getLogger(__name__)

__all__ = [
    "REDUCE_KEYS",
    "FittedEdits",
    "config_summary",
    "derive_run",
    "fit_edits",
    "history_embeddings",
    "read_run_tables",
    "recapture_pairs",
    "reduce_signature",
    "run_synthesis",
    "seed_partitions",
    "short_hash",
    "write_users_jsonl",
]

REDUCE_KEYS = ("subspace", "groups", "edit")
"""The config sections a reduce (and the edits it publishes) depends on."""


def reduce_signature(cfg: ChameleonConfig) -> dict[str, Any]:
    """The reduce-side settings of ``cfg`` (what decides whether a published run can be reused)."""
    return {k: getattr(cfg, k).model_dump() for k in REDUCE_KEYS}


def short_hash(d: dict[str, Any]) -> str:
    """An 8-character hash of a JSON-able dict (run ids, fit signatures)."""
    return key_hash(d)[:8]


def config_summary(cfg: ChameleonConfig) -> dict[str, Any]:
    """The settings a report shows of a configuration."""
    return {
        "synth": {
            k: getattr(cfg.synth, k)
            for k in (
                "pair_source",
                "shared_pairs",
                "reference_items",
                "heldout_items",
                "pairs_per_user",
                "history_k",
                "insight_max_new_tokens",
                "answer_max_new_tokens",
                "temperature",
                "batch_size",
            )
        },
        "subspace": {
            k: getattr(cfg.subspace, k) for k in ("site", "n_layers", "theta_p", "theta_n", "max_rank")
        },
        "groups": {k: getattr(cfg.groups, k) for k in ("n_groups", "min_group_size")},
        "edit": cfg.edit.model_dump(),
    }


# =============================================================================================
# The synthesis job


def write_users_jsonl(path: str | Path, questions: Sequence[LampQuestion]) -> Path:
    """The project's user records (LaMP-7 profile → history) of ``questions``, one JSON line each."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    recs = lamp_to_user_records(questions)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return p


def run_synthesis(
    users_path: str | Path,
    store: Store,
    run_id: str,
    cfg: ChameleonConfig,
    *,
    model_and_tokenizer=None,
    use_ray: bool = False,
    address: str | None = None,
    progress: bool = True,
    store_options: dict[str, Any] | None = None,
) -> RunManifest:
    """The job over the users file (fake it for every user, reduce, publish) unless ``run_id`` is
    already committed in ``store``; an interrupted run resumes from its finished partitions."""
    done = committed_manifest(store, run_id)
    if done is not None:
        log.info("run %s already committed; reusing it", run_id)
        return done
    return run_job(
        str(users_path),
        store,
        run_id,
        cfg,
        local=not use_ray,
        address=address,
        model_and_tokenizer=model_and_tokenizer,
        progress=progress,
        **(store_options or {}),
    )


def seed_partitions(
    store: Store, src_run_id: str, dst_run_id: str, users_path: str | Path, cfg: ChameleonConfig
) -> list[int]:
    """Copy the finished partitions of a committed run into a new, uncommitted run wherever the new
    run's partition holds exactly the same users with the same synthesis settings; the job then
    adopts them as resumed partitions instead of generating again. Returns the partitions copied.

    This extends an evaluation to more users (same tuning users first, more reported users after)
    at the cost of the new users only.
    """
    reader = RunReader(store, src_run_id)
    src_cfg = reader.manifest.config
    capture_keys = ("site", "candidate_layers", "layers")
    mismatch = [
        name
        for name, a, b in (
            ("synth", src_cfg.get("synth"), cfg.synth.model_dump()),
            ("model", src_cfg.get("model", {}).get("name_or_path"), cfg.model.name_or_path),
            (
                "users_per_partition",
                src_cfg.get("job", {}).get("users_per_partition"),
                cfg.job.users_per_partition,
            ),
            (
                "capture",
                {k: src_cfg.get("subspace", {}).get(k) for k in capture_keys},
                {k: getattr(cfg.subspace, k) for k in capture_keys},
            ),
        )
        if a != b
    ]
    if mismatch:
        raise ValueError(f"cannot reuse the synthesis of run {src_run_id}: different {', '.join(mismatch)}")
    if committed_manifest(store, dst_run_id) is not None:
        return []
    writer = RunWriter(store, dst_run_id)
    parts = partition_users(prepare_input(str(users_path), cfg).users, cfg.job.users_per_partition)
    copied = []
    for k in range(min(len(parts), reader.manifest.counts.partitions)):
        keys = part_keys(k)
        if read_done_record(writer, k) is not None:
            continue
        profiles, failures = reader.get_parquet(keys.profiles), reader.get_jsonl(keys.failures)
        ids = set(profiles.column("user_id").to_pylist()) | {r["user_id"] for r in failures}
        if ids != {u.user_id for u in parts[k]}:
            continue
        write_partition(
            writer,
            k,
            reader.get_parquet(keys.pairs),
            profiles,
            failures,
            fingerprint=reader.manifest.fingerprint,
        )
        copied.append(k)
    return copied


# =============================================================================================
# Reading a run's partitions, and runs derived from them


def read_run_tables(
    store: Store, run_id: str, user_ids: Sequence[str] | None = None
) -> tuple[pa.Table, pa.Table]:
    """(pairs, profiles) of a committed run's partitions (checksums verified), optionally only
    ``user_ids``' rows."""
    reader = RunReader(store, run_id)
    pairs, profiles, _ = read_partitions(reader, reader.manifest.counts.partitions)
    if pairs is None or profiles is None:
        raise RuntimeError(f"run {run_id} has no pairs")
    if user_ids is not None:
        pairs, profiles = filter_users(pairs, user_ids), filter_users(profiles, user_ids)
    return pairs, profiles


def derive_run(
    store: Store,
    src_run_id: str,
    dst_run_id: str,
    cfg: ChameleonConfig,
    user_ids: Sequence[str] | None = None,
    calibrate: Calibrate | None = None,
) -> RunManifest:
    """A new published run from another run's synthesis, without generating anything: the source's
    partitions (restricted to ``user_ids`` when given) are copied and reduced with ``cfg``'s
    subspace / group settings. Reuses ``dst_run_id`` when it is already committed.

    This is how the unseen-user setting gets groups built from tuning users only, and how a
    reduce configuration chosen on tuning users is applied to the stored pairs.
    """
    done = committed_manifest(store, dst_run_id)
    if done is not None:
        return done
    src = RunReader(store, src_run_id).manifest
    layers = list(src.captured_layers)
    if cfg.subspace.site != src.site:
        raise ValueError(
            f"run {src_run_id} captured site {src.site!r}; cannot derive a {cfg.subspace.site!r} run"
        )
    pairs, profiles = read_run_tables(store, src_run_id, user_ids)
    writer = RunWriter(store, dst_run_id)
    write_partition(writer, 0, pairs, profiles, [])
    counts = {
        "records": profiles.num_rows,
        "accepted": profiles.num_rows,
        "rejected": 0,
        "partitions": 1,
        "partitions_resumed": 0,
        "derived_from": src_run_id,
    }
    return reduce_and_publish(
        writer,
        cfg=cfg,
        layers=layers,
        fingerprint=src.fingerprint,
        n_partitions=1,
        counts=counts,
        timings={},
        calibrate=calibrate,
    )


def history_embeddings(profiles: pa.Table, user_ids: Sequence[str]) -> torch.Tensor:
    """[N, d] history embeddings (mean over a user's history items) of ``user_ids`` from a profiles table."""
    ids = profiles.column("user_id").to_pylist()
    emb = column_matrix(profiles, "history_embedding")
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
        """Each user's edit at ``level`` (``user`` or ``group``); None for a user without one."""
        if level == "user":
            return [self.user.get(u) for u in user_ids]
        if level == "group":
            return [self.group[self.group_of[u]] if u in self.group_of else None for u in user_ids]
        raise ValueError(f"level must be 'user' or 'group', got {level!r}")

    def for_history(self, history_embedding: torch.Tensor) -> list[Edit]:
        """Group edits by the nearest history centroid, as the job assigns users it never saw."""
        idx, _ = nearest_group(history_embedding, self.history_centroids)
        return [self.group[self.group_ids[i]] for i in idx.tolist()]

    @property
    def mean_group_size(self) -> float:
        return float(np.mean(list(self.group_sizes.values()))) if self.group_sizes else 0.0


def fit_edits(
    pairs: pa.Table, profiles: pa.Table, layers: Sequence[int], cfg: ChameleonConfig
) -> FittedEdits:
    """Reduce users, group them and reduce groups with ``cfg``: the job's own
    :func:`~chameleon.job.reduce.reduce_all`, kept in memory as edits by user and group id (additive
    forms use `edit.strength` at the reduce-chosen layers: calibrating needs a model)."""
    red = reduce_all(pairs, profiles, cfg, list(layers))
    site, ids, grouping = cfg.subspace.site, red.data.user_ids, red.grouping
    user = {
        u: (red.user_edit(i, cfg.edit, site) if bool(red.users.has_edit[i]) else None)
        for i, u in enumerate(ids)
    }
    group = {gid: red.group_edit(j, cfg.edit, site) for j, gid in enumerate(grouping.group_ids)}
    group_of = {u: grouping.group_ids[int(grouping.labels[i])] for i, u in enumerate(ids)}
    sizes = {gid: int(s) for gid, s in zip(grouping.group_ids, grouping.sizes, strict=True)}
    return FittedEdits(user, group_of, group, sizes, list(grouping.group_ids), grouping.history_centroids)


def recapture_pairs(
    model, tok, pairs: pa.Table, layers: Sequence[int], cfg: ChameleonConfig, site: str
) -> pa.Table:
    """The pairs table with ``emb_p`` / ``emb_n`` recaptured at another site, from the stored texts,
    rendered and reduced exactly as the synthesis did (``cfg.synth``): no generation."""
    prompts = [chat_prompt(tok, q, cfg.synth.system_prompt) for q in pairs.column("query").to_pylist()]
    at_site = cfg.model_copy(update={"subspace": cfg.subspace.model_copy(update={"site": site})})
    answers = pairs.column("personalized").to_pylist() + pairs.column("neutral").to_pylist()
    hidden = capture_answers(model, tok, prompts + prompts, answers, at_site, layers)
    n = len(prompts)
    width = hidden.shape[1] * hidden.shape[2]
    out = pairs.drop_columns(["emb_p", "emb_n"])
    return out.append_column("emb_p", vector_column(hidden[:n].numpy(), width)).append_column(
        "emb_n", vector_column(hidden[n:].numpy(), width)
    )
