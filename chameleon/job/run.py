"""What both drivers do around the map stage: open the run, plan partitions, and finish it.

    plan = begin_run(input_uri, store, run_id, cfg, n_model_layers)   # validate, rejects, partitions
    for k in plan.todo: ... map partition k (in process, or on Ray actors) ... write_partition(...)
    manifest = finish_run(plan, cfg, fingerprint)                      # failure limit, reduce, publish

The in-process driver (`local.py`) and the Ray driver (`ray_job.py`) differ only in how they map
the partitions, so they cannot drift apart in what they validate, adopt, refuse or publish.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from chameleon.config import ChameleonConfig
from chameleon.core.fingerprint import ModelFingerprint
from chameleon.core.records import UserRecord
from chameleon.data.artifacts import RunWriter
from chameleon.data.inputs import PreparedInput, prepare_input
from chameleon.data.layout import REJECTS, part_keys
from chameleon.data.storage import Store
from chameleon.job.publish import Calibrate, JobFailedError, reduce_and_publish
from chameleon.job.stages import candidate_layers

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """An opened run: the validated input, its fixed partitions, and which are still to map."""

    writer: RunWriter
    prepared: PreparedInput
    layers: list[int]
    partitions: list[list[UserRecord]]
    todo: list[int]
    timings: dict[str, float] = field(default_factory=dict)


def partition_users(users: Sequence[UserRecord], size: int) -> list[list[UserRecord]]:
    """Fixed partitions in input order: a rerun maps the same users to the same partition ids."""
    return [list(users[i : i + size]) for i in range(0, len(users), size)]


def write_partition(
    writer: RunWriter, k: int, pairs: pa.Table, profiles: pa.Table, failures: list[dict]
) -> None:
    """Write a finished partition; the pairs file goes last and marks it complete."""
    keys = part_keys(k)
    writer.put_parquet(keys.profiles, profiles)
    writer.put_jsonl(keys.failures, failures)
    writer.put_parquet(keys.pairs, pairs)


def adopt_partition(writer: RunWriter, k: int) -> bool:
    """True when partition k was completed (by an earlier attempt, or by a worker); records its files."""
    keys = part_keys(k)
    if not all(writer.exists(key) for key in keys.all()):
        return False
    for key in keys.all():
        writer.record_existing(key)
    return True


def begin_run(
    input_uri: str, store: Store, run_id: str, cfg: ChameleonConfig, n_model_layers: int, **store_options: Any
) -> RunPlan:
    """Validate the input, open the run, write its rejects, and find the partitions left to map."""
    t0 = time.perf_counter()
    prepared = prepare_input(input_uri, cfg, **store_options)
    if not prepared.users:
        raise ValueError(f"{input_uri}: no valid user records ({len(prepared.rejects)} rejected)")
    layers = candidate_layers(n_model_layers, cfg.subspace)
    writer = RunWriter(store, run_id)
    # Rejects are JSON-safe whatever the input held (repr of anything JSON cannot carry).
    writer.put_jsonl(REJECTS, [json.loads(json.dumps(r.to_dict(), default=repr)) for r in prepared.rejects])
    partitions = partition_users(prepared.users, cfg.job.users_per_partition)
    todo = [k for k in range(len(partitions)) if not adopt_partition(writer, k)]
    plan = RunPlan(writer, prepared, layers, partitions, todo)
    plan.timings["load_s"] = time.perf_counter() - t0
    log.info(
        "run %s: %d users in %d partitions, %d to map",
        run_id,
        len(prepared.users),
        len(partitions),
        len(todo),
    )
    return plan


def finish_run(
    plan: RunPlan, cfg: ChameleonConfig, fingerprint: ModelFingerprint, calibrate: Calibrate | None = None
) -> dict[str, Any]:
    """Check every partition is complete and the failure limit holds, then reduce, calibrate
    (with `calibrate`, a model replica's work) and publish."""
    writer = plan.writer
    missing = [k for k in plan.todo if not adopt_partition(writer, k)]
    if missing:
        raise JobFailedError(
            f"partitions {missing} did not complete; rerun with --run-id {writer.run_id} to resume"
        )
    counts = {
        "records": plan.prepared.n_input,
        "accepted": len(plan.prepared.users),
        "rejected": len(plan.prepared.rejects),
        "partitions": len(plan.partitions),
        "partitions_resumed": len(plan.partitions) - len(plan.todo),
    }
    return reduce_and_publish(
        writer,
        cfg=cfg,
        layers=plan.layers,
        fingerprint=fingerprint,
        n_partitions=len(plan.partitions),
        counts=counts,
        timings=plan.timings,
        max_user_failures=cfg.job.max_user_failures,
        calibrate=calibrate,
    )
