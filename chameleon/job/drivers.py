"""Pick where model work runs: in this process, or on Ray (imported only when asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chameleon.config import ChameleonConfig
from chameleon.core.edit import Edit
from chameleon.data.manifest import RunManifest
from chameleon.data.storage import Store
from chameleon.job.local import run_local


def run_job(
    input_uri: str,
    store: Store,
    run_id: str,
    cfg: ChameleonConfig,
    *,
    local: bool,
    address: str | None = None,
    model_and_tokenizer: Any = None,
    progress: bool = True,
    restart: bool = False,
    update_from: str | None = None,
    **store_options: Any,
) -> RunManifest:
    """Run the job in this process (`local`, optionally on an already loaded model) or on Ray;
    returns the committed manifest. `restart` starts an uncommitted run id over; `update_from`
    reuses a committed run's results for users whose record is unchanged (`job.refresh`)."""
    if local:
        return run_local(
            input_uri,
            store,
            run_id,
            cfg,
            model_and_tokenizer=model_and_tokenizer,
            progress=progress,
            restart=restart,
            update_from=update_from,
            **store_options,
        )
    from chameleon.job.ray_job import run_ray_job

    return run_ray_job(
        input_uri, store, run_id, cfg, address=address, restart=restart, update_from=update_from,
        progress=progress, **store_options,
    )  # fmt: skip


def answers_on_ray(
    cfg: ChameleonConfig,
    messages: Sequence[str],
    *,
    edits: Sequence[Edit | None] | None = None,
    **kwargs: Any,
) -> list[str]:
    """`core.generation.generate_answers` on an actor pool sized by `cfg.job` (see `job.replicas`)."""
    from chameleon.job.replicas import generate_answers_on_ray

    return generate_answers_on_ray(
        cfg, list(messages), edits=None if edits is None else list(edits), **kwargs
    )


def describe_run(manifest: RunManifest, store_uri: str) -> str:
    """What a finished run holds, in a few lines for a terminal."""
    c, t = manifest.counts, manifest.timings_s
    return "\n".join(
        (
            f"run {manifest.run_id}: {c.accepted} users accepted, {c.rejected or 0} rejected, "
            f"{c.users_failed} failed in the map stage, {c.users_with_edit} with their own edit, "
            f"{c.groups} groups, {c.pairs_kept}/{c.pairs} pairs kept",
            "time per stage: "
            + ", ".join(
                f"{k}={v:.1f}" for k, v in t.items() if k.endswith("_s") and not k.endswith("_per_s")
            ),
            *(
                [
                    f"map stage: {t['map_users']:,.0f} users mapped ({t['map_users_per_s']:.1f} users/s), "
                    f"{t['map_tokens']:,.0f} tokens generated ({t['map_tokens_per_s']:,.0f} tok/s), "
                    f"{t['map_users_failed']:,.0f} failed, {t['map_users_resumed']:,.0f} resumed"
                ]
                if "map_users" in t
                else []
            ),
            f"artifacts: {store_uri.rstrip('/')}/runs/{manifest.run_id}/ (manifest.json, latest updated)",
        )
    )
