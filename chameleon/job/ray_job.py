"""The distributed job: Ray Data map over model-replica actors → reduce → publish.

    users files ─ read, validate, hash-partition (Ray Data, `job.ray_input`) ─▶ staged partitions
               ─▶ ReplicaPool(PartitionWorker).run("map")
                                                   each actor = one model replica; writes
                                                   pairs/profiles/failures of its partitions
               ◀─ reduce users, group, reduce groups (driver; `job.run.finish_run`)
                 ─▶ the same actors .run("calibrate"): one item per group, no second model load
               ◀─ publish (driver)

The map stage runs exactly `job.refresh.map_reused`, the function the in-process driver runs,
on the records validated by the staging tasks (workers never re-validate under other limits).
Partitions are the unit of resume and of fault tolerance: a worker writes a partition's files into
its own attempt folder, then its done record; the driver adopts what the done records name. A
partition whose actor died is retried on a restarted actor, at most `job.max_task_retries` times
(`job.replicas`); one that keeps killing its actor, or passing `job.partition_timeout_s`, is then
recorded as failed: its users count against `job.max_user_failures` and a rerun maps it again.

Test-only fault injection: the environment variable `CHAMELEON_TEST_FAULTS` (JSON, read by the
driver and handed to the workers) makes a worker `os._exit(1)` (`{"exit_on_user": "<user id>"}`)
or hang (`{"hang_on_user": "<user id>"}`) on a partition holding that user. Nothing else reads it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from typing import Any

import pyarrow as pa

from chameleon.config import ChameleonConfig
from chameleon.core.calibration import Calibration
from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.generation import count_generated_tokens
from chameleon.core.marker_steering import MarkerParts
from chameleon.data.artifacts import RunReader, RunWriter
from chameleon.data.manifest import RunManifest
from chameleon.data.parallel_reads import read_in_order
from chameleon.data.storage import Store
from chameleon.job.calibrate import (
    GroupCalibrationTask,
    MarkerTask,
    ReplicaWork,
    calibrate_reduced,
    calibrate_task,
    derive_marker_parts,
)
from chameleon.job.progress import MapProgress
from chameleon.job.publish import JobFailedError
from chameleon.job.ray_input import read_staged, stage_input
from chameleon.job.reduce import Reduced
from chameleon.job.refresh import BUNDLE_PARTITIONS, check_source_model, in_bundles, map_reused, reuse_rows
from chameleon.job.replicas import ModelReplica, ReplicaPool, actor_resources, init_ray, item_deadline
from chameleon.job.run import (
    RunPlan,
    adopt_partition,
    begin_run,
    finish_run,
    record_failed_partition,
    take_record,
    write_partition,
)
from chameleon.job.spec import model_identity

FAULTS_ENV = "CHAMELEON_TEST_FAULTS"

log = logging.getLogger(__name__)


class PartitionWorker(ModelReplica):
    """One model replica of the job: maps partitions of users to pairs (written to the run, in
    its own attempt folder), then calibrates groups, on the model it loaded once."""

    def __init__(
        self,
        cfg_json: str,
        store: Store,
        run_id: str,
        layers: list[int],
        faults: dict[str, str] | None = None,
        source_run: str | None = None,
    ) -> None:
        super().__init__(cfg_json)
        self.layers = layers
        self.writer = RunWriter(store, run_id)
        self.fingerprint = fingerprint_model(self.model, self.cfg.model.name_or_path)
        self.faults = faults or {}
        self.source = RunReader(store, source_run) if source_run else None

    def _inject_faults(self, user_ids: set[str]) -> None:
        if self.faults.get("exit_on_user") in user_ids:
            os._exit(1)
        if self.faults.get("hang_on_user") in user_ids:
            time.sleep(10**6)

    def map(self, item: dict[str, Any]) -> dict[str, Any]:
        """Map one item: partitions (each with its user_ids, staged input and source_parts), one
        in a full run, a bundle in a refresh (`refresh.in_bundles`); errors come back as text."""
        parts, t0 = item["partitions"], time.perf_counter()
        ks, user_ids = [int(p["partition"]) for p in parts], {u for p in parts for u in p["user_ids"]}
        error, failed, records = "", 0, {}
        with (
            item_deadline(self.cfg.job.partition_timeout_s, f"partitions {ks}"),
            count_generated_tokens() as generated,
        ):
            self._inject_faults(user_ids)
            try:
                if self.source is not None:
                    check_source_model(self.source, self.fingerprint.to_dict())
                reuses = (
                    (k, reuse_rows(read_staged(self.writer.run_store, p["input"]), self.cfg, self.layers,
                                   self.source, p["source_parts"]))
                    for k, p in zip(ks, parts, strict=True)
                )  # fmt: skip
                for bundle in in_bundles(reuses, self.cfg, refresh=self.source is not None):
                    results = map_reused(self.model, self.tok, [r for _, r in bundle], self.cfg, self.layers)
                    for (k, reuse), (pairs, profiles, failures, reused) in zip(bundle, results, strict=True):
                        records[k] = write_partition(
                            self.writer, k, pairs, profiles, failures,
                            user_ids=[u.user_id for u in reuse.users], fingerprint=self.fingerprint, reused=reused,
                        )  # fmt: skip
                        failed += len(failures)
            except Exception as exc:  # e.g. the store stayed down past its retries
                error = f"{type(exc).__name__}: {exc}"
        return {
            "users": len(user_ids), "failed": failed, "tokens": generated.tokens,
            "seconds": time.perf_counter() - t0, "error": error, "records": records,
        }  # fmt: skip

    def calibrate(self, task: GroupCalibrationTask) -> Calibration:
        """Calibrate one group on the held-out texts of its members."""
        return calibrate_task(self.model, self.tok, task, self.cfg)

    def marker_directions(self, task: MarkerTask) -> MarkerParts:
        """The run's marker directions (`edit.markers`), on this replica's model."""
        return derive_marker_parts(self.model, self.tok, task, self.cfg)


class JobPool:
    """The job's actor pool, started when first needed and kept for the map and the calibration."""

    def __init__(self, plan: RunPlan, store: Store, cfg: ChameleonConfig) -> None:
        self.plan, self.store, self.cfg = plan, store, cfg
        self._pool: ReplicaPool | None = None

    def get(self, n_items: int) -> ReplicaPool:
        if self._pool is None:
            plan = self.plan
            self._pool = ReplicaPool(
                PartitionWorker, self.cfg, max(1, min(self.cfg.job.num_actors, n_items)),
                store=self.store, run_id=plan.run_writer.run_id, layers=plan.layers,
                faults=json.loads(os.environ.get(FAULTS_ENV) or "{}"),
                source_run=plan.source.run_id if plan.source is not None else None,
            )  # fmt: skip
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def calibrate_on_ray(reduced: Reduced, profiles: pa.Table, *, pool: JobPool) -> list[Calibration]:
    """`job.calibrate` for every group, spread over the job's actors (the models that mapped);
    the residual composition calibrates in two rounds (`calibrate_reduced`)."""
    work = ReplicaWork(
        calibrate=lambda tasks: _on_ray(pool, "calibrate", list(tasks), [t.group_id for t in tasks]),
        marker_directions=lambda task: _on_ray(pool, "marker_directions", [task], ["the marker task"])[0],
    )
    return calibrate_reduced(work, reduced, profiles, pool.cfg)


def _on_ray(pool: JobPool, method: str, tasks: list[Any], names: list[str]) -> list[Any]:
    """`method` for every task on the job's actors, results in task order."""
    results = pool.get(len(tasks)).run(method, tasks)
    missing = [k for k in range(len(tasks)) if k not in results]
    if missing:
        raise JobFailedError(f"{method} of {[names[k] for k in missing]} returned nothing")
    return [results[k] for k in range(len(tasks))]


def map_partitions(plan: RunPlan, pool: JobPool, *, progress: bool = True) -> None:
    """Map the plan's partitions on the actor pool; record the ones that kept killing their actor
    (or passing their deadline) as failed. A worker's error (such as a store outage longer than
    its retries) fails the job before anything is published."""
    cfg = pool.cfg
    staged = plan.staged
    assert staged is not None, "the Ray driver stages its input on the cluster"
    # A refresh hands each actor bundles of partitions, so that it maps their few changed users
    # together (`refresh.in_bundles`); a full run hands out partitions one by one.
    size = (
        1
        if plan.source is None
        else max(1, min(BUNDLE_PARTITIONS, len(plan.todo) // max(1, cfg.job.num_actors)))
    )
    bundles = [plan.todo[i : i + size] for i in range(0, len(plan.todo), size)]
    items = [
        {
            "partitions": [
                {
                    "partition": k,
                    "user_ids": plan.partition_ids[k],
                    "input": staged.inputs[k],
                    "source_parts": plan.source_parts(k),
                }
                for k in ks
            ]
        }
        for ks in bundles
    ]
    line = MapProgress(sum(map(len, plan.partition_ids)), resumed=plan.users_resumed, enabled=progress)

    def report(row: dict[str, Any]) -> None:
        # A partition that failed on its actor is reported as all of its users failed.
        failed = int(row["users"]) if row["error"] else int(row["failed"])
        line.update(int(row["users"]), failed, int(row["tokens"]))

    try:
        results = pool.get(len(items)).run("map", items, drop_lost_items=True, on_result=report)
    except Exception as exc:
        raise JobFailedError(
            f"the map stage stopped ({type(exc).__name__}: {exc}); finished partitions are kept: "
            f"rerun with --run-id {plan.run_writer.run_id} to resume"
        ) from exc
    finally:
        line.close()
        plan.timings.update(line.figures())
    errors = {bundles[i][0]: r["error"] for i, r in results.items() if r["error"]}
    if errors:
        k, error = sorted(errors.items())[0]
        raise JobFailedError(
            f"partition {k} failed on its actor: {error} ({len(errors)} items failed so); "
            f"nothing was published: rerun with --run-id {plan.run_writer.run_id} to resume"
        )
    tries = cfg.job.max_task_retries + 1
    records = {k: rec for r in results.values() for k, rec in r["records"].items()}
    for k in plan.todo:
        record = records.get(k)
        if record is not None and take_record(plan.run_writer, k, record):
            plan.adopted(k, record)
            continue
        record = adopt_partition(plan.run_writer, k, plan.partition_ids[k], retry_failed=False)
        if record is not None:
            plan.adopted(k, record)
        else:
            record_failed_partition(
                plan, k,
                f"killed its actor or passed its deadline ({cfg.job.partition_timeout_s:g} s) "
                f"{tries} times (job.max_task_retries={cfg.job.max_task_retries})",
            )  # fmt: skip


def run_ray_job(
    input_uri: str,
    store: Store,
    run_id: str,
    cfg: ChameleonConfig,
    *,
    address: str | None = None,
    restart: bool = False,
    update_from: str | None = None,
    progress: bool = True,
    **store_options: Any,
) -> RunManifest:
    """Run the job on a Ray cluster (a local one when no address is given); returns the manifest.
    `progress`: the map stage's live line (`job.progress`).

    Resume, `restart`, `update_from` and a committed run behave as in `job.local.run_local`."""
    init_ray(address)
    # Before the input is read: GPUs asked of a cluster without them fail the job now.
    resources = actor_resources(cfg)
    log.info(
        "map actors: %d, each with %g GPUs and %g CPUs",
        cfg.job.num_actors, resources["num_gpus"], resources["num_cpus"],
    )  # fmt: skip
    plan = begin_run(
        input_uri, store, run_id, cfg, model_identity(cfg), restart=restart, update_from=update_from,
        stage_input=lambda writer: stage_input(input_uri, writer, cfg, **store_options), **store_options,
    )  # fmt: skip
    if plan.committed is not None:
        return plan.committed
    pool = JobPool(plan, store, cfg)
    try:
        t1 = time.perf_counter()
        if plan.todo:
            map_partitions(plan, pool, progress=progress)
        plan.timings["map_s"] = time.perf_counter() - t1
        manifest = finish_run(plan, cfg, None, partial(calibrate_on_ray, pool=pool))
    finally:
        pool.close()
    drop_staged_input(plan, cfg)
    return manifest


def drop_staged_input(plan: RunPlan, cfg: ChameleonConfig) -> None:
    """Delete the committed run's staged input partitions: copies of the users' records that no
    reader needs once the run is published (a failed run keeps them until it is deleted)."""
    staged, run_store = plan.staged, plan.run_writer.run_store
    keys = [entry["key"] for entry in (staged.inputs if staged is not None else []) if entry]
    for _ in read_in_order(run_store.delete, keys, cfg.job.read_threads):
        pass
