"""The distributed job: Ray Data map over model-replica actors → reduce → publish.

    users file ─ validate (driver) ─ partitions ─▶ map_with_replicas(PartitionWorker)
                                                   each actor = one model replica; writes
                                                   pairs/profiles/failures of its partitions
               ◀─ reduce users, group, reduce groups (driver; `job.run.finish_run`)
                 ─▶ map_with_replicas(CalibrationWorker): one item per group
               ◀─ publish (driver)

The map stage runs exactly `job.stages.process_partition`, the function the in-process driver
runs, on the records the driver validated (workers never re-validate under other limits).
Partitions are the unit of resume and of fault tolerance: a partition is done when its pairs
file exists, so a rerun with the same run id skips it, and a partition whose actor died is
retried on a restarted actor (Ray Data restarts actors and retries their tasks).
"""

from __future__ import annotations

import json
import os
import pickle
import time
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
from transformers import AutoConfig

from chameleon.config import ChameleonConfig
from chameleon.core.calibration import Calibration
from chameleon.core.fingerprint import ModelFingerprint, fingerprint_model
from chameleon.core.model import resolve_name
from chameleon.core.records import UserRecord
from chameleon.data.artifacts import RunWriter
from chameleon.data.layout import FINGERPRINT
from chameleon.data.storage import Store
from chameleon.job.calibrate import calibrate_task, calibration_tasks
from chameleon.job.publish import JobFailedError
from chameleon.job.ray_env import init_ray
from chameleon.job.replicas import ModelReplica, map_with_replicas
from chameleon.job.run import begin_run, finish_run, write_partition
from chameleon.job.stages import Reduced, process_partition


class PartitionWorker(ModelReplica):
    """Maps partitions of users to pairs and writes them to the run."""

    def __init__(self, cfg_json: str, store: Store, run_id: str, layers: list[int]) -> None:
        super().__init__(cfg_json)
        self.layers = layers
        self.writer = RunWriter(store, run_id)
        fp = fingerprint_model(self.model, self.cfg.model.name_or_path)
        # Every replica writes the same content; the driver reads it for the manifest.
        self.writer.put_json(FINGERPRINT, fp.to_dict())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"partition": [], "users": [], "failed": [], "seconds": [], "pid": []}
        for k, users_json in zip(batch["partition"], batch["users"], strict=True):
            t0 = time.perf_counter()
            users = [UserRecord.from_dict(u) for u in json.loads(str(users_json))]
            pairs, profiles, failures = process_partition(self.model, self.tok, users, self.cfg, self.layers)
            write_partition(self.writer, int(k), pairs, profiles, failures)
            out["partition"].append(int(k))
            out["users"].append(len(users))
            out["failed"].append(len(failures))
            out["seconds"].append(time.perf_counter() - t0)
            out["pid"].append(os.getpid())
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
    tasks = calibration_tasks(reduced, profiles, cfg)
    items = [{"index": k, "task": pickle.dumps(task)} for k, task in enumerate(tasks)]
    results = map_with_replicas(items, CalibrationWorker, cfg)
    by_index = {int(r["index"]): pickle.loads(bytes(r["calibration"])) for r in results}
    missing = [k for k in range(len(tasks)) if k not in by_index]
    if missing:
        raise JobFailedError(f"calibration of groups {[tasks[k].group_id for k in missing]} returned nothing")
    return [by_index[k] for k in range(len(tasks))]


def model_num_layers(cfg: ChameleonConfig) -> int:
    """Depth of the configured model from its config alone (the driver loads no weights)."""
    mc = AutoConfig.from_pretrained(
        resolve_name(cfg.model), revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    mc = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    return int(mc.num_hidden_layers)


def run_ray_job(
    input_uri: str,
    store: Store,
    run_id: str,
    cfg: ChameleonConfig,
    *,
    address: str | None = None,
    **store_options: Any,
) -> dict[str, Any]:
    """Run the job on a Ray cluster (a local one when no address is given); returns the manifest."""
    init_ray(address)
    plan = begin_run(input_uri, store, run_id, cfg, model_num_layers(cfg), **store_options)
    t1 = time.perf_counter()
    if plan.todo:
        items = [
            {"partition": k, "users": json.dumps([u.to_dict() for u in plan.partitions[k]])}
            for k in plan.todo
        ]
        map_with_replicas(items, PartitionWorker, cfg, store=store, run_id=run_id, layers=plan.layers)
    plan.timings["map_s"] = time.perf_counter() - t1
    plan.writer.record_existing(FINGERPRINT)
    fp = ModelFingerprint.from_dict(plan.writer.get_json(FINGERPRINT))
    return finish_run(plan, cfg, fp, partial(calibrate_on_ray, cfg=cfg))
