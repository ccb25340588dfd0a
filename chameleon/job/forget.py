"""Forget users: find every run that holds them, publish a run without them, optionally delete the old.

    holding = runs_holding(store, ["u1"])            # {run_id: RunHolding}, every run of the store
    result = forget_users(store, ["u1"])             # a new run from `latest`, without u1

Finding: every object of every run is read, committed or not (`chameleon.data.user_scan`, which
also states how ids are matched: as given and normalized, rejects by parsed id, unreadable lines
by token).

The new run is the source run's own pipeline minus the users: its map-stage partitions are copied
with the users' rows removed (their pairs, profiles and failures), `rejects.jsonl` loses every
reject that is theirs, and the reduce, grouping (with the privacy floor), calibration and publish
run again on what is left, under the source run's config and model. Nothing of the users reaches
the new run: no id, no text, and no edit pooled from their pairs. No model is needed unless the
edits are calibrated (additive forms with `edit.calibrate`), which runs the model in this process.
When the source run does not hold the users, no new run is made.

With `delete_old`, every run that holds them is then deleted: committed runs, and runs without a
manifest (an abandoned job, or a deletion an earlier forget did not finish). Forget is safe to
rerun after a crash at any point: the rerun finds what is left and ends in the same state. Do not
run it while a job on the same store is writing a run that holds the users.

The users file the runs were made from still holds the users: remove them there too, or the next
`chameleon personalize` brings them back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from chameleon.core.fingerprint import check_compatible, fingerprint_model
from chameleon.data.artifacts import LATEST, MANIFEST, RUNS, RunReader, RunWriter, latest_run_id, new_run_id
from chameleon.data.capabilities import check_store
from chameleon.data.ids import validate_id
from chameleon.data.layout import part_keys, reject_files
from chameleon.data.manifest import ForgetSource, RunManifest
from chameleon.data.model_mirror import load_model_for
from chameleon.data.storage import Store
from chameleon.data.user_scan import RunHolding, UserMatch, scan_runs
from chameleon.job.calibrate import calibrate_in_process
from chameleon.job.publish import reduce_and_publish
from chameleon.job.run import write_partition
from chameleon.job.tables import without_user_reduce

log = logging.getLogger(__name__)


def runs_holding(store: Store, user_ids: Sequence[str]) -> dict[str, RunHolding]:
    """{run id: which of the users it holds, and where} over every run of the store (see
    `chameleon.data.user_scan`)."""
    return scan_runs(store, UserMatch(user_ids))


@dataclass
class ForgetResult:
    source_run: str | None
    """None when the store has no committed run."""
    new_run: str | None
    """None when the source run did not hold the users (nothing to copy)."""
    manifest: RunManifest | None
    holding: dict[str, RunHolding]
    """runs that held the users before (committed or not, the source included)"""
    moved_latest: bool = False
    deleted: list[str] = field(default_factory=list)
    still_holding: list[str] = field(default_factory=list)
    """runs that hold the users after this call (kept without `delete_old`)"""


def delete_run(store: Store, run_id: str) -> None:
    """Remove every object of a run; the manifest goes first, so readers never see a half run (an
    interrupted deletion leaves a run without manifest, which the next forget finds)."""
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
    single_writer: bool = False,
) -> ForgetResult:
    """Publish a copy of `source_run` without `user_ids` when it holds them (see the module doc);
    with `delete_old`, then delete every run that holds them. Returns what was done, and what
    still holds them by a scan made after.

    `latest` moves to the new run only when the source was the latest run. Deleting is refused
    (before anything is written) when it would leave `latest` pointing at a deleted run.
    `single_writer`: allow a store without exclusive create (`chameleon.data.capabilities`).
    """
    match = UserMatch(user_ids)
    check_store(store, single_writer=single_writer)
    latest = latest_run_id(store)
    # No committed run at all (only abandoned jobs hold the users): nothing to copy, still to delete.
    src = RunReader(store, source_run) if latest is not None or source_run != LATEST else None
    holding = scan_runs(store, match)
    moves_latest = src is not None and src.run_id == latest
    if delete_old and latest in holding and not moves_latest:
        raise ValueError(
            f"the latest run {latest!r} holds {sorted(holding[latest].users)}; forget from it first "
            "(omit --run), so `latest` moves to the new run before old runs are deleted"
        )
    result = ForgetResult(src.run_id if src else None, None, None, holding)
    if src is not None and src.run_id in holding:
        result.manifest = _publish_without(store, src, match, new_run, model_and_tokenizer, moves_latest)
        result.new_run, result.moved_latest = result.manifest.run_id, moves_latest
    if delete_old:
        for run_id in sorted(holding):
            if run_id != result.new_run:
                delete_run(store, run_id)
                result.deleted.append(run_id)
    result.still_holding = sorted(scan_runs(store, match))
    return result


def _publish_without(
    store: Store,
    src: RunReader,
    match: UserMatch,
    new_run: str | None,
    model_and_tokenizer: Any,
    set_latest: bool,
) -> RunManifest:
    """A new run from `src`'s partitions and rejects without the users' rows; its manifest."""
    manifest = src.manifest
    cfg = manifest.chameleon_config()
    fingerprint = manifest.fingerprint
    n_parts = manifest.counts.partitions
    writer = RunWriter(store, new_run or new_run_id("forget"))
    t0 = time.perf_counter()
    removed_users: set[str] = set()
    removed_accepted = 0
    for k in range(n_parts):
        keys = part_keys(k)
        pairs = match.drop_rows(src.get_parquet(keys.pairs))
        # Without the stored per-user results: the reduce recomputes them from the pairs left (their
        # CCS batches had the forgotten users in them).
        all_profiles = src.get_parquet(keys.profiles)
        profiles = without_user_reduce(match.drop_rows(all_profiles))
        failures = src.get_jsonl(keys.failures)
        kept = [f for f in failures if match.keeps(f)]
        # Mapped and failed users were all accepted.
        removed_accepted += all_profiles.num_rows - profiles.num_rows + len(failures) - len(kept)
        removed_users |= set(all_profiles.column("user_id").to_pylist()) - set(
            profiles.column("user_id").to_pylist()
        )
        removed_users |= {f["user_id"] for f in failures if not match.keeps(f)}
        write_partition(writer, k, pairs, profiles, kept)
    kept_rejects, n_rejects = [], 0
    for name in reject_files(src.files):  # rejects.jsonl, or the Ray job's rejects/*.jsonl
        rejects = src.get_jsonl(name)
        n_rejects += len(rejects)
        kept_here = [r for r in rejects if not match.rejects_of(r)]
        writer.put_jsonl(name, kept_here)
        kept_rejects += kept_here
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
        model, tok = model_and_tokenizer or load_model_for(cfg.model)
        check_compatible(
            fingerprint.to_dict(), fingerprint_model(model, cfg.model.name_or_path), run_id=src.run_id
        )
        calibrate = partial(calibrate_in_process, model, tok, cfg=cfg)
    return reduce_and_publish(
        writer,
        cfg=cfg,
        layers=list(manifest.captured_layers),
        fingerprint=fingerprint,
        n_partitions=n_parts,
        counts=new_counts,
        timings={"forget_copy_s": time.perf_counter() - t0},
        calibrate=calibrate,
        forget=ForgetSource(
            source_run=src.run_id,
            users_removed=len(removed_users),
            rejects_removed=n_rejects - len(kept_rejects),
        ),
        set_latest=set_latest,
    )
