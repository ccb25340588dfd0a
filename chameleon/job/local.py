"""The in-process driver: users file → pairs → user and group subspaces → artifacts, one process.

The Ray driver (`chameleon.job.ray_job`) runs the same stages with the map stage spread over
actors; this driver is the reference it is measured against, and what `chameleon personalize
--local` runs on a laptop.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from chameleon.config import ChameleonConfig
from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.generation import count_generated_tokens
from chameleon.core.model import num_layers
from chameleon.data.manifest import RunManifest
from chameleon.data.model_mirror import load_model_for
from chameleon.data.storage import Store
from chameleon.job.calibrate import calibrate_in_process
from chameleon.job.progress import MapProgress
from chameleon.job.refresh import check_source_model, in_bundles, map_reused, reuse_rows
from chameleon.job.run import begin_run, finish_run, write_partition
from chameleon.job.spec import model_identity


def run_local(
    input_uri: str,
    store: Store,
    run_id: str,
    cfg: ChameleonConfig,
    *,
    model_and_tokenizer=None,
    progress: bool = True,
    restart: bool = False,
    update_from: str | None = None,
    **store_options: Any,
) -> RunManifest:
    """Run the whole job in this process; returns the run's manifest.

    Rerunning with the same run id resumes under the same job spec: partitions already complete
    in the store are adopted, not recomputed (`restart` starts the run id over instead). A
    committed run is returned as it is (and `latest` moved to it if a crash left it behind).
    `update_from`: a committed run whose results are reused for unchanged users (`job.refresh`).
    """
    t0 = time.perf_counter()
    model, tok = model_and_tokenizer or load_model_for(cfg.model)
    load_s = time.perf_counter() - t0
    identity = {**model_identity(cfg), "num_layers": num_layers(model)}
    plan = begin_run(
        input_uri, store, run_id, cfg, identity, restart=restart, update_from=update_from, **store_options
    )
    if plan.committed is not None:
        return plan.committed
    plan.timings["load_s"] += load_s
    fingerprint = fingerprint_model(model, cfg.model.name_or_path)
    source = plan.source.reader if plan.source is not None else None
    if source is not None:
        check_source_model(source, fingerprint.to_dict())
    t1 = time.perf_counter()
    line = MapProgress(len(plan.prepared.users), resumed=plan.users_resumed, enabled=progress)
    reuses = (
        (k, reuse_rows(plan.partitions[k], cfg, plan.layers, source, plan.source_parts(k))) for k in plan.todo
    )
    for bundle in in_bundles(reuses, cfg, refresh=source is not None):
        with count_generated_tokens() as generated:
            results = map_reused(model, tok, [r for _, r in bundle], cfg, plan.layers)
        for (k, reuse), (pairs, profiles, failures, reused) in zip(bundle, results, strict=True):
            record = write_partition(
                plan.run_writer, k, pairs, profiles, failures,
                user_ids=[u.user_id for u in reuse.users], fingerprint=fingerprint, reused=reused,
            )  # fmt: skip
            plan.adopted(k, record)
        users, failed = sum(len(r.users) for _, r in bundle), sum(len(f) for _, _, f, _ in results)
        line.update(users, failed, generated.tokens)
    line.close()
    plan.timings["map_s"] = time.perf_counter() - t1
    plan.timings.update(line.figures())
    calibrate = partial(calibrate_in_process, model, tok, cfg=cfg)
    return finish_run(plan, cfg, fingerprint, calibrate)
