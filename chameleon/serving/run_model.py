"""The base model a server loads: the one that made the run it serves, unless told otherwise.

A run's manifest records its model (name, revision) and the job's `model:` section (dtype).
`with_run_model` fills the serving config's model from the manifest of the run to serve (`run`,
or the run `latest` names at start) for every field the operator did not set: the model name and
its revision together (a model named in the config or with `--model` keeps its own revision), and
the dtype. The device settings (`device`, `device_map`) stay the deployment's own. A run made for
another model than the one loaded is still refused by its fingerprint, as for every run.
"""

from __future__ import annotations

import logging
from typing import Any

from chameleon.data.artifacts import RunNotFoundError, RunReader
from chameleon.data.manifest import RunManifest
from chameleon.data.storage import Store, open_store
from chameleon.serving.config import ServeConfig

log = logging.getLogger("chameleon.serving")


def manifest_model(run: RunManifest) -> dict[str, Any]:
    """`ModelConfig` fields a run's manifest records: name_or_path, revision, dtype (the one
    place serving reads the model out of a manifest)."""
    job_model = run.config.get("model") or {}
    fields = {"name_or_path": run.model.id, "revision": run.model.revision, "dtype": job_model.get("dtype")}
    return {k: v for k, v in fields.items() if v is not None}


def with_run_model(cfg: ServeConfig, store: Store | None = None) -> tuple[ServeConfig, str]:
    """`cfg` with its model taken from the manifest of the run it serves where not set, and one
    line saying where the model came from. `store`: an open store (default: `cfg.store`). With no
    run published yet, the configured model stays. Logs the line too."""
    cfg, source = _with_run_model(cfg, store)
    log.info("base model %s (%s)", cfg.model.name_or_path, source)
    return cfg, source


def _with_run_model(cfg: ServeConfig, store: Store | None) -> tuple[ServeConfig, str]:
    told = cfg.model.model_fields_set if "model" in cfg.model_fields_set else set()
    wanted = {"dtype"} - told
    if "name_or_path" not in told:
        wanted |= {"name_or_path", "revision"}
    if not wanted:
        return cfg, "the configured model"
    if store is None:
        store = open_store(cfg.store, **({"endpoint_url": cfg.s3_endpoint} if cfg.s3_endpoint else {}))
    try:
        reader = RunReader(store, cfg.run)
    except RunNotFoundError:
        return cfg, f"no run published yet: the configured model ({cfg.model.name_or_path})"
    recorded = manifest_model(reader.manifest)
    taken = {k: v for k, v in recorded.items() if k in wanted}
    if "name_or_path" in taken and "revision" not in recorded:
        taken["revision"] = None  # the run's model at its default revision, not the configured one
    if not taken:
        return cfg, "the configured model"
    model = cfg.model.model_copy(update=taken)
    return cfg.model_copy(
        update={"model": model}
    ), f"the model of run {reader.run_id} ({', '.join(sorted(taken))})"
