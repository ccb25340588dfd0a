"""What both drivers do around the map stage: open the run, plan partitions, and finish it.

    plan = begin_run(input_uri, store, run_id, cfg, model)   # validate, check the job spec, adopt
    if plan.committed: return plan.committed                  # done before (`latest` repaired)
    for k in plan.todo: ... map partition k (in process, or on Ray actors) ... write_partition(...)
    manifest = finish_run(plan, cfg, fingerprint)             # invariants, failure limit, publish

The in-process driver (`local.py`) and the Ray driver (`ray_job.py`) differ only in how they map
the partitions, so they cannot drift apart in what they validate, adopt, refuse or publish.

Resume never mixes runs: the run's job spec (`job.spec`) must match, and a partition is adopted
only from its done record (`parts/part-K.json`) when the record names exactly the partition's
users, every file it lists is there with its recorded hash, and at least one of its users was
mapped (a partition in which every user failed, e.g. on a broken actor, is mapped again).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from chameleon.config import ChameleonConfig
from chameleon.core.fingerprint import ModelFingerprint
from chameleon.core.records import UserRecord
from chameleon.data.artifacts import (
    RunImmutableError,
    RunWriter,
    committed_manifest,
    latest_run_id,
    point_latest,
)
from chameleon.data.capabilities import check_store
from chameleon.data.inputs import PreparedInput, prepare_input
from chameleon.data.layout import JOB_SPEC, REJECTS, done_key, part_keys
from chameleon.data.manifest import RunManifest
from chameleon.data.storage import Store, StoreConflictError, StoreKeyError
from chameleon.job.publish import Calibrate, JobFailedError, reduce_and_publish
from chameleon.job.spec import build_spec, check_spec
from chameleon.job.stages import candidate_layers
from chameleon.job.tables import pairs_to_tables

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """An opened run: the validated input, its fixed partitions, and which are still to map.

    `committed` is the manifest when the run was already committed (nothing is left to do)."""

    writer: RunWriter | None
    prepared: PreparedInput
    layers: list[int]
    partitions: list[list[UserRecord]]
    todo: list[int]
    spec: dict[str, Any]
    committed: RunManifest | None = None
    fingerprints: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    """The model each done partition was mapped with (None: a partition recorded as failed)."""
    failed_partitions: dict[int, str] = field(default_factory=dict)
    """Partitions of this attempt recorded as failed as a whole, with why."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def users_resumed(self) -> int:
        """Accepted users of the partitions adopted from an earlier attempt (not to map again)."""
        return len(self.prepared.users) - sum(len(self.partitions[k]) for k in self.todo)

    @property
    def run_writer(self) -> RunWriter:
        if self.writer is None:
            raise RuntimeError("the run is already committed: nothing to write")
        return self.writer


def partition_users(users: Sequence[UserRecord], size: int) -> list[list[UserRecord]]:
    """Fixed partitions in input order: a rerun maps the same users to the same partition ids."""
    return [list(users[i : i + size]) for i in range(0, len(users), size)]


def write_partition(
    writer: RunWriter,
    k: int,
    pairs: pa.Table,
    profiles: pa.Table,
    failures: list[dict],
    *,
    user_ids: Sequence[str] | None = None,
    fingerprint: ModelFingerprint | None = None,
) -> None:
    """Write a finished partition's files, then its done record (which makes it adoptable).

    `user_ids`: the partition's users (default: the mapped and failed users it holds);
    `fingerprint`: the model that mapped it."""
    keys = part_keys(k)
    entries = {
        keys.profiles: writer.put_parquet(keys.profiles, profiles),
        keys.failures: writer.put_jsonl(keys.failures, failures),
        keys.pairs: writer.put_parquet(keys.pairs, pairs),
    }
    if user_ids is None:
        user_ids = profiles.column("user_id").to_pylist() + [f["user_id"] for f in failures]
    record = {
        "partition": k,
        "user_ids": list(user_ids),
        "mapped": profiles.num_rows,
        "failed": len(failures),
        "files": entries,
        "fingerprint": fingerprint.to_dict() if fingerprint is not None else None,
        "attempt": writer.attempt,
    }
    # Outside the attempt folder, last writer wins: every record points at one attempt's files.
    writer.run_store.put_bytes(done_key(k), (json.dumps(record, indent=1) + "\n").encode())


def read_done_record(writer: RunWriter, k: int) -> dict[str, Any] | None:
    """Partition k's done record, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads(writer.run_store.get_bytes(done_key(k)))
    except (StoreKeyError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def adopt_partition(
    writer: RunWriter, k: int, users: Sequence[UserRecord], *, retry_failed: bool = True
) -> dict[str, Any] | None:
    """Partition k's done record when it can be kept (its files now recorded by `writer`), else
    None. `retry_failed`: refuse a partition in which every user failed (an earlier attempt's)."""
    record = read_done_record(writer, k)
    if record is None:
        return None
    ids = record.get("user_ids") or []
    if sorted(ids) != sorted(u.user_id for u in users) or len(set(ids)) != len(ids):
        log.warning("partition %d was made for other users; mapping it again", k)
        return None
    if retry_failed and users and record.get("failed", 0) >= len(users):
        log.info("every user of partition %d failed before; mapping it again", k)
        return None
    if set(record["files"]) != set(part_keys(k).all()) or not all(
        writer.adopt(rel, entry) for rel, entry in record["files"].items()
    ):
        log.warning(
            "partition %d's files are missing or differ from their recorded hashes; mapping it again", k
        )
        return None
    return record


def _restart(store: Store, run_id: str) -> None:
    """Delete every file of an uncommitted run (`--restart`)."""
    run_store = store.child(f"runs/{run_id}")
    keys = run_store.list("")
    for key in keys:
        run_store.delete(key)
    log.warning("run %s restarted: %d files of earlier attempts deleted", run_id, len(keys))


def _repair_latest(store: Store, run_id: str, manifest: RunManifest) -> None:
    """A run committed by a job that died before moving `latest`: move it now, unless `latest`
    already names a run committed later."""
    current = latest_run_id(store)
    if current == run_id:
        return
    if current is not None:
        newer = committed_manifest(store, current)
        if newer is not None and newer.created_at > manifest.created_at:
            log.warning("run %s is committed; latest stays at the newer run %s", run_id, current)
            return
    point_latest(store, run_id)
    log.warning("run %s was committed but latest was %s; latest now points at it", run_id, current)


def begin_run(
    input_uri: str,
    store: Store,
    run_id: str,
    cfg: ChameleonConfig,
    model: Mapping[str, Any],
    *,
    restart: bool = False,
    **store_options: Any,
) -> RunPlan:
    """Validate the input, open the run under its job spec (or refuse), write its rejects, and
    find the partitions left to map. `model`: `job.spec.model_identity(cfg)`. `restart` deletes
    an uncommitted run's earlier attempts first."""
    t0 = time.perf_counter()
    # Before anything is written: refuse a store that would let a second writer replace the run.
    check_store(store, single_writer=cfg.storage.single_writer)
    prepared = prepare_input(input_uri, cfg, **store_options)
    if not prepared.users:
        raise ValueError(f"{input_uri}: no valid user records ({len(prepared.rejects)} rejected)")
    layers = candidate_layers(int(model["num_layers"]), cfg.subspace)
    spec = build_spec(cfg, prepared.users, prepared.n_input, layers, model)
    partitions = partition_users(prepared.users, cfg.job.users_per_partition)
    committed = committed_manifest(store, run_id)
    if committed is not None:
        if restart:
            raise RunImmutableError(
                f"run {run_id} is committed: --restart cannot start it over; use a new run id"
            )
        if committed.job_spec is not None:
            check_spec(run_id, committed.job_spec, spec, committed=True)
        _repair_latest(store, run_id, committed)
        return RunPlan(None, prepared, layers, partitions, [], spec, committed=committed)
    if restart:
        _restart(store, run_id)
    writer = RunWriter(store, run_id)
    spec_bytes = (json.dumps(spec, indent=1) + "\n").encode()
    try:
        writer.run_store.put_bytes(JOB_SPEC, spec_bytes, if_absent=True)
    except StoreConflictError:
        check_spec(run_id, json.loads(writer.run_store.get_bytes(JOB_SPEC)), spec, committed=False)
    # Rejects are JSON-safe whatever the input held (repr of anything JSON cannot carry).
    writer.put_jsonl(REJECTS, [json.loads(json.dumps(r.to_dict(), default=repr)) for r in prepared.rejects])
    plan = RunPlan(writer, prepared, layers, partitions, [], spec)
    for k, users in enumerate(partitions):
        record = adopt_partition(writer, k, users)
        if record is None:
            plan.todo.append(k)
        else:
            plan.fingerprints[k] = record.get("fingerprint")
    plan.timings["load_s"] = time.perf_counter() - t0
    log.info(
        "run %s: %d users in %d partitions, %d to map",
        run_id,
        len(prepared.users),
        len(partitions),
        len(plan.todo),
    )
    return plan


def record_failed_partition(plan: RunPlan, k: int, reason: str) -> None:
    """Record partition k as failed as a whole (every user failed, with `reason`): it counts
    against the failure limit now and is mapped again by a rerun."""
    pairs, profiles = pairs_to_tables([])
    users = [u.user_id for u in plan.partitions[k]]
    failures = [{"user_id": u, "reason": reason} for u in users]
    write_partition(plan.run_writer, k, pairs, profiles, failures, user_ids=users)
    plan.fingerprints[k] = None
    plan.failed_partitions[k] = reason


def _one_fingerprint(plan: RunPlan, fingerprint: ModelFingerprint | None) -> ModelFingerprint:
    """The model every mapped partition was made with; refuses a mix."""
    by_model: dict[str, list[int]] = {}
    for k, fp in sorted(plan.fingerprints.items()):
        if fp is not None:
            by_model.setdefault(json.dumps(fp, sort_keys=True), []).append(k)
    seen = set(by_model)
    if fingerprint is not None:
        seen.add(json.dumps(fingerprint.to_dict(), sort_keys=True))
    if len(seen) > 1:
        groups = "; ".join(f"partitions {ks}" for ks in by_model.values())
        raise JobFailedError(
            f"the partitions of run {plan.run_writer.run_id} were mapped with different model weights "
            f"({groups}, and this job's model); rerun with --restart to map them all with one model"
        )
    if not seen:
        raise JobFailedError(f"no partition of run {plan.run_writer.run_id} was mapped by a model")
    return ModelFingerprint.from_dict(json.loads(seen.pop()))


def finish_run(
    plan: RunPlan,
    cfg: ChameleonConfig,
    fingerprint: ModelFingerprint | None = None,
    calibrate: Calibrate | None = None,
) -> RunManifest:
    """Check every partition is complete, mapped by one model (`fingerprint`, when the driver
    loaded it), that every accepted user is mapped or failed exactly once and the failure limit
    holds; then reduce, calibrate (with `calibrate`, a model replica's work) and publish."""
    writer = plan.run_writer
    for k in plan.todo:
        if k not in plan.fingerprints:  # mapped by this attempt's workers
            record = adopt_partition(writer, k, plan.partitions[k], retry_failed=False)
            if record is not None:
                plan.fingerprints[k] = record.get("fingerprint")
    missing = [k for k in range(len(plan.partitions)) if k not in plan.fingerprints]
    if missing:
        raise JobFailedError(
            f"partitions {missing} did not complete; rerun with --run-id {writer.run_id} to resume"
        )
    fp = _one_fingerprint(plan, fingerprint)
    counts = {
        "records": plan.prepared.n_input,
        "accepted": len(plan.prepared.users),
        "rejected": len(plan.prepared.rejects),
        "partitions": len(plan.partitions),
        "partitions_resumed": len(plan.partitions) - len(plan.todo),
        "partitions_failed": len(plan.failed_partitions),
    }
    note = "; ".join(f"partition {k}: {why}" for k, why in sorted(plan.failed_partitions.items()))
    return reduce_and_publish(
        writer,
        cfg=cfg,
        layers=plan.layers,
        fingerprint=fp,
        n_partitions=len(plan.partitions),
        counts=counts,
        timings=plan.timings,
        max_user_failures=cfg.job.max_user_failures,
        calibrate=calibrate,
        expected_user_ids=[u.user_id for u in plan.prepared.users],
        failure_note=note,
        job_spec=plan.spec,
    )
