"""Forget users: find the runs that hold them, publish a run without them, optionally delete the old.

    holding = runs_holding(store, ["u1"])            # {run_id: ["u1"]}, committed runs only
    result = forget_users(store, ["u1"])             # a new run from `latest`, without u1

The new run is the source run's own pipeline minus the users: its map-stage partitions are copied
with the users' rows removed (their pairs, profiles and failures), `rejects.jsonl` loses every
reject that names them, and the reduce, grouping (with the privacy floor), calibration and publish
run again on what is left, under the source run's config and model. Nothing of the users reaches
the new run: no id, no text, and no edit pooled from their pairs. No model is needed unless the
edits are calibrated (additive forms with `edit.calibrate`), which runs the model in this process.

The users file the runs were made from still holds the users: remove them there too, or the next
`chameleon personalize` brings them back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from chameleon.core.fingerprint import check_compatible, fingerprint_model
from chameleon.core.model import load_model
from chameleon.data.artifacts import LATEST, MANIFEST, RUNS, RunReader, RunWriter, latest_run_id, new_run_id
from chameleon.data.ids import validate_id
from chameleon.data.layout import ASSIGNMENTS, REJECTS, part_keys
from chameleon.data.manifest import ForgetSource, RunManifest
from chameleon.data.storage import Store
from chameleon.job.calibrate import calibrate_in_process
from chameleon.job.publish import reduce_and_publish
from chameleon.job.run import write_partition
from chameleon.job.tables import without_user_reduce

log = logging.getLogger(__name__)


def _run_ids(store: Store) -> tuple[list[str], list[str]]:
    """(committed run ids, run ids without a manifest), sorted."""
    runs: dict[str, bool] = {}
    for key in store.list(f"{RUNS}/"):
        parts = key.split("/")
        if len(parts) >= 3:
            runs[parts[1]] = runs.get(parts[1], False) or parts[2] == MANIFEST
    return sorted(r for r, c in runs.items() if c), sorted(r for r, c in runs.items() if not c)


def _users_in(reader: RunReader) -> set[str]:
    """Every user id a committed run holds: published, failed in the map stage, or rejected."""
    ids = set(reader.get_parquet(ASSIGNMENTS).column("user_id").to_pylist())
    for name in reader.files:
        if name.startswith("failures/") or name == REJECTS:
            ids.update(str(row.get("user_id")) for row in reader.get_jsonl(name) if row.get("user_id"))
    return ids


def runs_holding(store: Store, user_ids: Sequence[str]) -> dict[str, list[str]]:
    """{run id: the given users it holds} over every committed run of the store."""
    wanted = set(user_ids)
    committed, _ = _run_ids(store)
    out = {}
    for run_id in committed:
        held = sorted(wanted & _users_in(RunReader(store, run_id)))
        if held:
            out[run_id] = held
    return out


def _drop_users(table: pa.Table, user_ids: Sequence[str]) -> pa.Table:
    mask = pc.is_in(table.column("user_id"), value_set=pa.array(list(user_ids), pa.string()))
    return table.filter(pc.invert(pc.fill_null(mask, False)))


def _names_any(row: Any, user_ids: Sequence[str]) -> bool:
    """Whether a reject names one of the users anywhere (its user_id or inside its record)."""
    text = json.dumps(row, ensure_ascii=False)
    return row.get("user_id") in user_ids or any(json.dumps(u)[1:-1] in text for u in user_ids)


@dataclass
class ForgetResult:
    source_run: str
    new_run: str
    manifest: RunManifest
    holding: dict[str, list[str]]
    """runs that held the users before (committed runs, the source included)"""
    moved_latest: bool = False
    deleted: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    """runs without a manifest (a job in progress or abandoned): not checked, may hold the users"""


def delete_run(store: Store, run_id: str) -> None:
    """Remove every object of a run; the manifest goes first, so readers never see a half run."""
    prefix = f"{RUNS}/{validate_id(run_id, 'run id')}/"
    store.delete(prefix + MANIFEST)
    for key in store.list(prefix):
        store.delete(key)


def forget_users(
    store: Store,
    user_ids: Sequence[str],
    *,
    source_run: str = LATEST,
    new_run: str | None = None,
    delete_old: bool = False,
    model_and_tokenizer: Any = None,
) -> ForgetResult:
    """Publish a copy of `source_run` without `user_ids` (see the module doc); with `delete_old`,
    then delete every committed run that held them. Returns what was done.

    `latest` moves to the new run only when the source was the latest run. Deleting is refused
    (before anything is written) when it would leave `latest` pointing at a deleted run.
    """
    ids = sorted({validate_id(u, "user id") for u in user_ids})
    if not ids:
        raise ValueError("no user ids to forget")
    latest = latest_run_id(store)
    src = RunReader(store, source_run)
    holding = runs_holding(store, ids)
    moves_latest = src.run_id == latest
    if delete_old and latest in holding and not moves_latest:
        raise ValueError(
            f"the latest run {latest!r} holds {holding[latest]}; forget from it first "
            "(omit --run), so `latest` moves to the new run before old runs are deleted"
        )
    manifest = src.manifest
    cfg = manifest.chameleon_config()
    fingerprint = manifest.fingerprint
    n_parts = manifest.counts.partitions
    writer = RunWriter(store, new_run or new_run_id("forget"))
    t0 = time.perf_counter()
    gone = set(ids)
    removed_users = len(gone & _users_in(src))
    removed_accepted = len(gone & set(src.get_parquet(ASSIGNMENTS).column("user_id").to_pylist()))
    for k in range(n_parts):
        keys = part_keys(k)
        pairs = _drop_users(src.get_parquet(keys.pairs), ids)
        # Without the stored per-user results: the reduce recomputes them from the pairs left (their
        # CCS batches had the forgotten users in them).
        profiles = without_user_reduce(_drop_users(src.get_parquet(keys.profiles), ids))
        failures = src.get_jsonl(keys.failures)
        kept = [f for f in failures if f.get("user_id") not in gone]
        removed_accepted += len(failures) - len(kept)  # failed users were accepted too
        write_partition(writer, k, pairs, profiles, kept)
    rejects = src.get_jsonl(REJECTS)
    kept_rejects = [r for r in rejects if not _names_any(r, ids)]
    writer.put_jsonl(REJECTS, kept_rejects)
    accepted = manifest.counts.accepted - removed_accepted
    new_counts = {
        "records": accepted + len(kept_rejects),
        "accepted": accepted,
        "rejected": len(kept_rejects),
        "partitions": n_parts,
        "partitions_resumed": 0,
    }
    calibrate = None
    if cfg.edit.form != "projection" and cfg.edit.calibrate:
        model, tok = model_and_tokenizer or load_model(cfg.model)
        check_compatible(
            fingerprint.to_dict(), fingerprint_model(model, cfg.model.name_or_path), run_id=src.run_id
        )
        calibrate = partial(calibrate_in_process, model, tok, cfg=cfg)
    published = reduce_and_publish(
        writer,
        cfg=cfg,
        layers=list(manifest.captured_layers),
        fingerprint=fingerprint,
        n_partitions=n_parts,
        counts=new_counts,
        timings={"forget_copy_s": time.perf_counter() - t0},
        calibrate=calibrate,
        forget=ForgetSource(source_run=src.run_id, users_removed=removed_users),
        set_latest=moves_latest,
    )
    result = ForgetResult(src.run_id, writer.run_id, published, holding, moved_latest=moves_latest)
    if delete_old:
        for run_id in sorted(holding):
            delete_run(store, run_id)
            result.deleted.append(run_id)
    result.incomplete = _run_ids(store)[1]
    return result
