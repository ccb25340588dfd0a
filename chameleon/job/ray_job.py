"""The distributed job: Ray Data map over model-replica actors → reduce → publish.

    users file ─ validate (driver) ─ partitions ─▶ map_with_replicas(PartitionWorker)
                                                   each actor = one model replica; writes
                                                   pairs/profiles/failures of its partitions
               ◀─ reduce users, group, reduce groups (driver; `job.run.finish_run`)
                 ─▶ map_with_replicas(CalibrationWorker): one item per group
               ◀─ publish (driver)

The map stage runs exactly `job.stages.process_partition`, the function the in-process driver
runs, on the records the driver validated (workers never re-validate under other limits).
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
import pickle
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from chameleon.config import ChameleonConfig
from chameleon.core.calibration import Calibration
from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.generation import count_generated_tokens
from chameleon.core.records import UserRecord
from chameleon.data.artifacts import RunWriter
from chameleon.data.manifest import RunManifest
from chameleon.data.storage import Store
from chameleon.job.calibrate import GroupCalibrationTask, calibrate_reduced, calibrate_task
from chameleon.job.progress import MapProgress
from chameleon.job.publish import JobFailedError
from chameleon.job.reduce import Reduced
from chameleon.job.replicas import ModelReplica, actor_resources, item_deadline, map_with_replicas
from chameleon.job.run import (
    RunPlan,
    adopt_partition,
    begin_run,
    finish_run,
    record_failed_partition,
    write_partition,
)
from chameleon.job.spec import model_identity
from chameleon.job.stages import process_partition
from chameleon.ray_env import init_ray

FAULTS_ENV = "CHAMELEON_TEST_FAULTS"

log = logging.getLogger(__name__)


class PartitionWorker(ModelReplica):
    """Maps partitions of users to pairs and writes them to the run (in its own attempt folder)."""

    def __init__(
        self,
        cfg_json: str,
        store: Store,
        run_id: str,
        layers: list[int],
        faults: dict[str, str] | None = None,
    ) -> None:
        super().__init__(cfg_json)
        self.layers = layers
        self.writer = RunWriter(store, run_id)
        self.fingerprint = fingerprint_model(self.model, self.cfg.model.name_or_path)
        self.faults = faults or {}

    def _inject_faults(self, user_ids: set[str]) -> None:
        if self.faults.get("exit_on_user") in user_ids:
            os._exit(1)
        if self.faults.get("hang_on_user") in user_ids:
            time.sleep(10**6)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {
            "partition": [], "users": [], "failed": [], "tokens": [], "seconds": [], "pid": [], "error": [],
        }  # fmt: skip
        for k, users_json in zip(batch["partition"], batch["users"], strict=True):
            t0 = time.perf_counter()
            users = [UserRecord.from_dict(u) for u in json.loads(str(users_json))]
            error, failed = "", 0
            with (
                item_deadline(self.cfg.job.partition_timeout_s, f"partition {int(k)}"),
                count_generated_tokens() as generated,
            ):
                self._inject_faults({u.user_id for u in users})
                try:
                    pairs, profiles, failures = process_partition(
                        self.model, self.tok, users, self.cfg, self.layers
                    )
                    write_partition(
                        self.writer, int(k), pairs, profiles, failures,
                        user_ids=[u.user_id for u in users], fingerprint=self.fingerprint,
                    )  # fmt: skip
                    failed = len(failures)
                except Exception as exc:  # e.g. the store stayed down past its retries
                    error = f"{type(exc).__name__}: {exc}"
            out["partition"].append(int(k))
            out["users"].append(len(users))
            out["failed"].append(failed)
            out["tokens"].append(generated.tokens)
            out["seconds"].append(time.perf_counter() - t0)
            out["pid"].append(os.getpid())
            out["error"].append(error)
        return out


class CalibrationWorker(ModelReplica):
    """Calibrates groups (one per item) on the held-out texts of their members."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"index": [], "calibration": []}
        for k, blob in zip(batch["index"], batch["task"], strict=True):
            task = pickle.loads(bytes(blob))  # written by this job's driver just before
            out["index"].append(int(k))
            out["calibration"].append(pickle.dumps(calibrate_task(self.model, self.tok, task, self.cfg)))
        return out


def calibrate_on_ray(reduced: Reduced, profiles: pa.Table, *, cfg: ChameleonConfig) -> list[Calibration]:
    """`job.calibrate` for every group, spread over the actor pool."""
    return calibrate_reduced(partial(_calibrate_tasks_on_ray, cfg=cfg), reduced, profiles, cfg)


def _calibrate_tasks_on_ray(
    tasks: Sequence[GroupCalibrationTask], *, cfg: ChameleonConfig
) -> list[Calibration]:
    items = [{"index": k, "task": pickle.dumps(task)} for k, task in enumerate(tasks)]
    results = map_with_replicas(items, CalibrationWorker, cfg)
    by_index = {int(r["index"]): pickle.loads(bytes(r["calibration"])) for r in results}
    missing = [k for k in range(len(tasks)) if k not in by_index]
    if missing:
        raise JobFailedError(f"calibration of groups {[tasks[k].group_id for k in missing]} returned nothing")
    return [by_index[k] for k in range(len(tasks))]


def map_partitions(plan: RunPlan, store: Store, cfg: ChameleonConfig, *, progress: bool = True) -> None:
    """Map the plan's partitions on the actor pool; record the ones that kept killing their actor
    (or passing their deadline) as failed. A worker's error (such as a store outage longer than
    its retries) fails the job before anything is published."""
    items = [
        {"partition": k, "users": json.dumps([u.to_dict() for u in plan.partitions[k]])} for k in plan.todo
    ]
    faults = json.loads(os.environ.get(FAULTS_ENV) or "{}")
    line = MapProgress(len(plan.prepared.users), resumed=plan.users_resumed, enabled=progress)

    def report(row: dict[str, Any]) -> None:
        # A partition that failed on its actor is reported as all of its users failed.
        failed = int(row["users"]) if row["error"] else int(row["failed"])
        line.update(int(row["users"]), failed, int(row["tokens"]))

    try:
        results = map_with_replicas(
            items, PartitionWorker, cfg, drop_lost_items=True, on_row=report,
            store=store, run_id=plan.run_writer.run_id, layers=plan.layers, faults=faults,
        )  # fmt: skip
    except Exception as exc:
        raise JobFailedError(
            f"the map stage stopped ({type(exc).__name__}: {exc}); finished partitions are kept: "
            f"rerun with --run-id {plan.run_writer.run_id} to resume"
        ) from exc
    finally:
        line.close()
        plan.timings.update(line.figures())
    errors = {int(r["partition"]): r["error"] for r in results if r["error"]}
    if errors:
        k, error = sorted(errors.items())[0]
        raise JobFailedError(
            f"partition {k} failed on its actor: {error} ({len(errors)} partitions failed so); "
            f"nothing was published: rerun with --run-id {plan.run_writer.run_id} to resume"
        )
    tries = cfg.job.max_task_retries + 1
    for k in plan.todo:
        record = adopt_partition(plan.run_writer, k, plan.partitions[k], retry_failed=False)
        if record is not None:
            plan.fingerprints[k] = record.get("fingerprint")
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
    progress: bool = True,
    **store_options: Any,
) -> RunManifest:
    """Run the job on a Ray cluster (a local one when no address is given); returns the manifest.
    `progress`: the map stage's live line (`job.progress`).

    Resume, `restart` and a committed run behave as in `job.local.run_local`."""
    init_ray(address)
    # Before the input is read: GPUs asked of a cluster without them fail the job now.
    resources = actor_resources(cfg)
    log.info(
        "map actors: %d, each with %g GPUs and %g CPUs",
        cfg.job.num_actors, resources["num_gpus"], resources["num_cpus"],
    )  # fmt: skip
    plan = begin_run(input_uri, store, run_id, cfg, model_identity(cfg), restart=restart, **store_options)
    if plan.committed is not None:
        return plan.committed
    t1 = time.perf_counter()
    if plan.todo:
        map_partitions(plan, store, cfg, progress=progress)
    plan.timings["map_s"] = time.perf_counter() - t1
    return finish_run(plan, cfg, None, partial(calibrate_on_ray, cfg=cfg))
