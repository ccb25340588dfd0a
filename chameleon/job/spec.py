"""What a run is made from: its job spec, recorded when the run is first opened.

    runs/<run_id>/job-spec.json   config (without the job's runtime and storage settings), input,
                                  model, prompt version, partition size, captured layers

A run's partitions are only valid together when they were all made under one spec: another
partition size cuts users into other partitions (users duplicated or lost), another input holds
other users (a deleted user would be published again), other captured layers relabel hidden
states. So resuming under another spec is refused with what differs (`--restart` starts the run
id over), and the committed manifest carries the spec it was made under.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoConfig

from chameleon.config import ChameleonConfig
from chameleon.core import prompts
from chameleon.core.fingerprint import config_sha256
from chameleon.core.model import resolve_name
from chameleon.core.records import UserRecord
from chameleon.data.model_mirror import is_mirrored, mirrored_config

SPEC_VERSION = 1
OLD_DEFAULTS = {"partitioning": "input_order"}
RUNTIME_SECTIONS = ("job", "storage")
"""Config sections that change how the job runs, not what it makes (actors, retries, deadlines,
S3 timeouts): free to change on resume. The partition size is recorded on its own."""


class JobSpecMismatchError(ValueError):
    """A run was reopened with another config, input, model or partition size than it was started with."""


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_config(cfg: ChameleonConfig) -> Any:
    """The model's (text) config, read without loading weights."""
    if is_mirrored(cfg.model.name_or_path):  # its config only: the driver needs no weights
        mc = mirrored_config(cfg.model.name_or_path)
    else:
        mc = AutoConfig.from_pretrained(
            resolve_name(cfg.model),
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    return mc.get_text_config() if hasattr(mc, "get_text_config") else mc


def model_identity(cfg: ChameleonConfig) -> dict[str, Any]:
    """The model as the spec knows it before any replica loads it: name, revision, config hash
    and depth (a change of weights alone is caught by the partitions' fingerprints)."""
    mc = model_config(cfg)
    return {
        "name_or_path": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "config_sha256": config_sha256(mc),
        "num_layers": int(mc.num_hidden_layers),
    }


def input_summary(users: Sequence[UserRecord], n_input: int) -> dict[str, Any]:
    """The accepted records, canonical: what the partitions are cut from (whitespace or key order
    in the file do not matter; any change of a user's data does)."""
    return {"records": n_input, "accepted": len(users), "sha256": _sha256_json([u.to_dict() for u in users])}


def build_spec(
    cfg: ChameleonConfig,
    input_info: Mapping[str, Any],
    layers: Sequence[int],
    model: Mapping[str, Any],
    *,
    partitioning: str = "input_order",
) -> dict[str, Any]:
    """The spec of a run over an input (`input_summary`, or the Ray driver's staged digest) on
    `model`; `partitioning`: `input_order` (the in-process driver) or `hash` (of the user id)."""
    config = {k: v for k, v in cfg.model_dump().items() if k not in RUNTIME_SECTIONS}
    return {
        "spec_version": SPEC_VERSION,
        "config_sha256": _sha256_json(config),
        "config": config,
        "input": dict(input_info),
        "model": dict(model),
        "prompt_version": prompts.PROMPT_VERSION,
        "partition_size": cfg.job.users_per_partition,
        "partitioning": partitioning,
        "captured_layers": list(layers),
    }


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def spec_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two specs, one phrase each (empty when they match)."""
    out = []
    for field, what in (
        ("update_from", "source run of the refresh (--update-from)"),
        ("partition_size", "partition size (job.users_per_partition)"),
        ("partitioning", "partitioning (input order: --local; user-id hash: Ray)"),
        ("captured_layers", "captured layers"),
        ("prompt_version", "prompt version"),
    ):
        # Specs written before a field existed hold its only value then.
        old, new = (spec.get(field, OLD_DEFAULTS.get(field)) for spec in (recorded, current))
        if old != new:
            out.append(f"{what} {old} -> {new}")
    old_in, new_in = recorded.get("input") or {}, current.get("input") or {}
    if old_in != new_in:
        out.append(
            f"input ({old_in.get('accepted')} -> {new_in.get('accepted')} accepted users of "
            f"{old_in.get('records')} -> {new_in.get('records')} records, records sha256 "
            f"{str(old_in.get('sha256'))[:12]} -> {str(new_in.get('sha256'))[:12]})"
        )
    old_m, new_m = recorded.get("model") or {}, current.get("model") or {}
    changed = [k for k in sorted(set(old_m) | set(new_m)) if old_m.get(k) != new_m.get(k)]
    if changed:
        out.append("model " + ", ".join(f"{k} {old_m.get(k)} -> {new_m.get(k)}" for k in changed))
    if recorded.get("config_sha256") != current.get("config_sha256"):
        old_c, new_c = _flat(recorded.get("config") or {}), _flat(current.get("config") or {})
        keys = [k for k in sorted(set(old_c) | set(new_c)) if old_c.get(k) != new_c.get(k)]
        shown = ", ".join(f"{k} {old_c.get(k)!r} -> {new_c.get(k)!r}" for k in keys[:6])
        more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
        out.append(f"config {shown or '(hash only)'}{more}")
    return out


def check_spec(
    run_id: str, recorded: Mapping[str, Any], current: Mapping[str, Any], *, committed: bool
) -> None:
    """Refuse (`JobSpecMismatchError`) to resume `run_id` under another spec than it was made with."""
    diffs = spec_differences(recorded, current)
    if not diffs:
        return
    remedy = (
        "it is committed, so give this job a new run id"
        if committed
        else f"rerun with the settings and input it was started with, or with --restart to start run "
        f"{run_id} over (its finished partitions are discarded)"
    )
    raise JobSpecMismatchError(
        f"run {run_id} was started from another job spec; differs in: {'; '.join(diffs)}. {remedy}"
    )


def check_refresh_source(
    source_id: str, recorded: Mapping[str, Any] | None, current: Mapping[str, Any]
) -> None:
    """Refuse (`JobSpecMismatchError`) a refresh from a run made under another spec than this
    job's, its input, partition size and own source aside: its per-user results would differ."""
    if not recorded:
        raise JobSpecMismatchError(f"run {source_id} records no job spec: it cannot be refreshed")
    free = {"input": None, "partition_size": None, "partitioning": None, "update_from": None}
    diffs = spec_differences({**recorded, **free}, {**current, **free})
    if diffs:
        raise JobSpecMismatchError(
            f"cannot refresh run {source_id}: it was made under another job spec; differs in: "
            f"{'; '.join(diffs)}. Run without --update-from (a full run) instead"
        )
