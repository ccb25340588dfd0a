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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from chameleon.config import ChameleonConfig
from chameleon.core.fingerprint import ModelFingerprint
from chameleon.core.records import UserRecord
from chameleon.data.artifacts import (
    RunImmutableError,
    RunReader,
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
from chameleon.job.refresh import RefreshSource, check_source_model, open_source
from chameleon.job.spec import build_spec, check_refresh_source, check_spec, input_summary
from chameleon.job.stages import candidate_layers
from chameleon.job.staging import StagedInput, jsonl_safe_rows
from chameleon.job.tables import pairs_to_tables

log = logging.getLogger(__name__)


StageInput = Callable[[RunWriter], StagedInput]
"""Reads the input into a run's attempt folder (the Ray driver's `job.ray_input.stage_input`)."""


@dataclass
class RunPlan:
    """An opened run: the validated input, its fixed partitions, and which are still to map.

    The input is either read by this driver (`prepared`, `partitions`: the in-process driver) or
    staged on the cluster (`staged`: the Ray driver), never both.
    `committed` is the manifest when the run was already committed (nothing is left to do)."""

    writer: RunWriter | None
    prepared: PreparedInput | None
    layers: list[int]
    partitions: list[list[UserRecord]] | None
    todo: list[int]
    spec: dict[str, Any]
    partition_ids: list[list[str]] = field(default_factory=list)
    """per partition: its users' ids"""
    staged: StagedInput | None = None
    committed: RunManifest | None = None
    fingerprints: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    """The model each done partition was mapped with (None: a partition recorded as failed)."""
    reused: dict[int, int] = field(default_factory=dict)
    """Users of each done partition whose results came from the refresh source (`job.refresh`)."""
    source: RefreshSource | None = None
    """The run a refresh (`--update-from`) reuses per-user results of."""
    failed_partitions: dict[int, str] = field(default_factory=dict)
    """Partitions of this attempt recorded as failed as a whole, with why."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def users_resumed(self) -> int:
        """Accepted users of the partitions adopted from an earlier attempt (not to map again)."""
        return sum(map(len, self.partition_ids)) - sum(len(self.partition_ids[k]) for k in self.todo)

    @property
    def run_writer(self) -> RunWriter:
        if self.writer is None:
            raise RuntimeError("the run is already committed: nothing to write")
        return self.writer

    def source_parts(self, k: int) -> list[int]:
        """The refresh source's partitions holding partition k's users (none without a source)."""
        if self.source is None:
            return []
        return self.source.partitions_for(self.partition_ids[k])

    @property
    def counts(self) -> dict[str, int]:
        """records, accepted, rejected"""
        if self.staged is not None:
            s = self.staged
            return {"records": s.records, "accepted": s.records - s.rejected, "rejected": s.rejected}
        p = self.prepared
        assert p is not None
        return {"records": p.n_input, "accepted": len(p.users), "rejected": len(p.rejects)}

    def adopted(self, k: int, record: Mapping[str, Any]) -> None:
        """Note a done partition's record: its model and how many users it reused."""
        self.fingerprints[k] = record.get("fingerprint")
        self.reused[k] = len(record.get("reused") or [])


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
    reused: Sequence[str] = (),
) -> dict[str, Any]:
    """Write a finished partition's files, then its done record (which makes it adoptable);
    returns the record.

    `user_ids`: the partition's users (default: the mapped and failed users it holds);
    `fingerprint`: the model that mapped it; `reused`: users whose rows a refresh copied from its
    source run instead of mapping them."""
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
        "reused": list(reused),
    }
    # Outside the attempt folder, last writer wins: every record points at one attempt's files.
    writer.run_store.put_bytes(done_key(k), (json.dumps(record, indent=1) + "\n").encode())
    return record


def read_done_record(writer: RunWriter, k: int) -> dict[str, Any] | None:
    """Partition k's done record, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads(writer.run_store.get_bytes(done_key(k)))
    except (StoreKeyError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def adopt_partition(
    writer: RunWriter, k: int, users: Sequence[UserRecord | str], *, retry_failed: bool = True
) -> dict[str, Any] | None:
    """Partition k's done record when it can be kept (its files now recorded by `writer`), else
    None. `users`: the partition's users (records or ids). `retry_failed`: refuse a partition in
    which every user failed (an earlier attempt's)."""
    record = read_done_record(writer, k)
    if record is None:
        return None
    ids = record.get("user_ids") or []
    want = sorted(u if isinstance(u, str) else u.user_id for u in users)
    if sorted(ids) != want or len(set(ids)) != len(ids):
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


def take_record(writer: RunWriter, k: int, record: Mapping[str, Any]) -> bool:
    """Keep partition k as the worker that just mapped it in this job reported it (its done
    record), without reading its files back; False when the record is not partition k's."""
    files = record.get("files") or {}
    if record.get("partition") != k or set(files) != set(part_keys(k).all()):
        return False
    for rel, entry in files.items():
        writer.record_written(rel, entry)
    return True


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
    update_from: str | None = None,
    stage_input: StageInput | None = None,
    **store_options: Any,
) -> RunPlan:
    """Validate the input, open the run under its job spec (or refuse), write its rejects, and
    find the partitions left to map. `model`: `job.spec.model_identity(cfg)`. `restart` deletes
    an uncommitted run's earlier attempts first. `update_from`: a committed run whose per-user
    results are reused for users whose record is unchanged (`job.refresh`). `stage_input`: read
    the input off this driver (the Ray driver's), partitions by a stable hash of the user id;
    without it this driver reads the input and cuts partitions in input order."""
    t0 = time.perf_counter()
    # Before anything is written: refuse a store that would let a second writer replace the run.
    check_store(store, single_writer=cfg.storage.single_writer)
    layers = candidate_layers(int(model["num_layers"]), cfg.subspace)
    committed = committed_manifest(store, run_id)
    if committed is not None and restart:
        raise RunImmutableError(
            f"run {run_id} is committed: --restart cannot start it over; use a new run id"
        )
    prepared = partitions = staged = None
    if stage_input is None or committed is not None:
        # A committed run staged by the Ray driver is checked here too (read on this driver).
        prepared = prepare_input(input_uri, cfg, **store_options)
        if not prepared.users:
            raise ValueError(f"{input_uri}: no valid user records ({len(prepared.rejects)} rejected)")
        partitions = partition_users(prepared.users, cfg.job.users_per_partition)
    if committed is not None:
        how = "hash" if stage_input is not None else "input_order"
        spec = build_spec(
            cfg, input_summary(prepared.users, prepared.n_input), layers, model, partitioning=how
        )
        recorded = committed.job_spec
        if recorded is not None:
            if stage_input is not None:  # partitioned by hash on the cluster: the input's digest differs
                recorded, spec = {**recorded, "input": None}, {**spec, "input": None}
            check_spec(run_id, recorded, spec, committed=True)
        _repair_latest(store, run_id, committed)
        return RunPlan(None, prepared, layers, partitions, [], spec, committed=committed)
    if restart:
        _restart(store, run_id)
    writer = RunWriter(store, run_id)
    if stage_input is not None:
        staged = stage_input(writer)
        info = {
            "records": staged.records,
            "accepted": staged.records - staged.rejected,
            "sha256": staged.sha256,
        }
        spec = build_spec(cfg, info, layers, model, partitioning="hash")
        partition_ids = staged.partition_ids
    else:
        spec = build_spec(cfg, input_summary(prepared.users, prepared.n_input), layers, model)
        partition_ids = [[u.user_id for u in p] for p in partitions]
    source = None
    if update_from is not None:
        reader = RunReader(store, update_from)
        check_refresh_source(update_from, reader.manifest.job_spec, spec)
        spec["update_from"] = reader.run_id
        source = open_source(reader, cfg.job.read_threads)
    spec_bytes = (json.dumps(spec, indent=1) + "\n").encode()
    try:
        writer.run_store.put_bytes(JOB_SPEC, spec_bytes, if_absent=True)
    except StoreConflictError:
        check_spec(run_id, json.loads(writer.run_store.get_bytes(JOB_SPEC)), spec, committed=False)
    if prepared is not None:
        # Rejects are JSON-safe whatever the input held (repr of anything JSON cannot carry).
        writer.put_jsonl(REJECTS, jsonl_safe_rows([r.to_dict() for r in prepared.rejects]))
    plan = RunPlan(
        writer, prepared, layers, partitions, [], spec, partition_ids, staged=staged, source=source
    )
    for k, ids in enumerate(partition_ids):
        record = adopt_partition(writer, k, ids)
        if record is None:
            plan.todo.append(k)
        else:
            plan.adopted(k, record)
    plan.timings["load_s"] = time.perf_counter() - t0
    log.info(
        "run %s: %d users in %d partitions, %d to map",
        run_id,
        sum(map(len, partition_ids)),
        len(partition_ids),
        len(plan.todo),
    )
    return plan


def record_failed_partition(plan: RunPlan, k: int, reason: str) -> None:
    """Record partition k as failed as a whole (every user failed, with `reason`): it counts
    against the failure limit now and is mapped again by a rerun."""
    pairs, profiles = pairs_to_tables([])
    users = list(plan.partition_ids[k])
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
            record = adopt_partition(writer, k, plan.partition_ids[k], retry_failed=False)
            if record is not None:
                plan.adopted(k, record)
    n_partitions = len(plan.partition_ids)
    missing = [k for k in range(n_partitions) if k not in plan.fingerprints]
    if missing:
        raise JobFailedError(
            f"partitions {missing} did not complete; rerun with --run-id {writer.run_id} to resume"
        )
    fp = _one_fingerprint(plan, fingerprint)
    if plan.source is not None:
        try:
            check_source_model(plan.source.reader, fp.to_dict())
        except ValueError as exc:
            raise JobFailedError(str(exc)) from None
    counts = {
        **plan.counts,
        "partitions": n_partitions,
        "partitions_resumed": n_partitions - len(plan.todo),
        "partitions_failed": len(plan.failed_partitions),
        "users_reused": sum(plan.reused.values()),
    }
    note = "; ".join(f"partition {k}: {why}" for k, why in sorted(plan.failed_partitions.items()))
    return reduce_and_publish(
        writer,
        cfg=cfg,
        layers=plan.layers,
        fingerprint=fp,
        n_partitions=n_partitions,
        counts=counts,
        timings=plan.timings,
        max_user_failures=cfg.job.max_user_failures,
        calibrate=calibrate,
        expected_user_ids=[u for ids in plan.partition_ids for u in ids],
        failure_note=note,
        job_spec=plan.spec,
    )
