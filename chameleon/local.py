"""The in-process driver: users file → pairs → user and group subspaces → artifacts, one process.

The Ray job (`chameleon.pipeline`) runs the same stages with the map stage spread over actors;
this driver is the reference it is measured against, and what `chameleon personalize --local`
runs on a laptop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from chameleon.artifacts import RunWriter, fingerprint_model
from chameleon.config import ChameleonConfig
from chameleon.inputs import read_user_records
from chameleon.model import load_model, num_layers
from chameleon.runs import partition_done, partition_users, reduce_and_publish, write_partition, write_rejects
from chameleon.schema import UserRecord, validate_records
from chameleon.stages import candidate_layers, process_partition
from chameleon.storage import Store

log = logging.getLogger(__name__)


@dataclass
class PreparedInput:
    users: list[UserRecord]
    rejects: list
    n_input: int


def prepare_input(input_uri: str, cfg: ChameleonConfig, **store_options: Any) -> PreparedInput:
    """Read and validate the users file (rejects keep their reason; nothing is dropped silently)."""
    raw = read_user_records(input_uri, **store_options)
    users, rejects = validate_records(
        raw,
        max_history_items=cfg.synth.max_history_items,
        max_item_chars=cfg.synth.max_item_chars,
        group_column=cfg.groups.group_column,
    )
    return PreparedInput(users, rejects, len(raw))


def run_local(
    input_uri: str,
    store: Store,
    run_id: str,
    cfg: ChameleonConfig,
    *,
    model_and_tokenizer=None,
    progress: bool = True,
    **store_options: Any,
) -> dict[str, Any]:
    """Run the whole job in this process; returns the run's manifest.

    Rerunning with the same run id resumes: partitions already complete in the store are
    adopted, not recomputed.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prepared = prepare_input(input_uri, cfg, **store_options)
    if not prepared.users:
        raise ValueError(f"{input_uri}: no valid user records ({len(prepared.rejects)} rejected)")
    model, tok = model_and_tokenizer or load_model(cfg.model)
    layers = candidate_layers(num_layers(model), cfg.subspace)
    writer = RunWriter(store, run_id)
    write_rejects(writer, prepared.rejects)
    timings["load_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    parts = partition_users(prepared.users, cfg.job.users_per_partition)
    skipped = 0
    for k, part in enumerate(tqdm(parts, desc="fake it (partitions)", disable=not progress)):
        if partition_done(writer, k):
            skipped += 1
            continue
        pairs, profiles, failures = process_partition(model, tok, part, cfg, layers)
        write_partition(writer, k, pairs, profiles, failures)
    timings["map_s"] = time.perf_counter() - t1

    counts = {
        "records": prepared.n_input,
        "accepted": len(prepared.users),
        "rejected": len(prepared.rejects),
        "partitions": len(parts),
        "partitions_resumed": skipped,
    }
    fp = fingerprint_model(model, cfg.model.name_or_path)
    return reduce_and_publish(writer, cfg, layers, fp, cfg.model.name_or_path, len(parts), counts, timings)
