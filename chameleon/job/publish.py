"""Reduce a run's partitions and publish its artifacts: user shards, group edits, assignments,
centroids, marker directions, then the manifest (last) and the `latest` pointer."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import torch

from chameleon.config import ChameleonConfig
from chameleon.core import prompts
from chameleon.core.calibration import Calibration
from chameleon.core.fingerprint import ModelFingerprint
from chameleon.core.markers import MARKERS, history_shows
from chameleon.data.artifacts import RunWriter
from chameleon.data.layout import (
    ASSIGNMENTS,
    CALIBRATION,
    CENTROIDS,
    MARKER_DIRECTIONS,
    USER_SHARD_SIZE,
    column_matrix,
    group_key,
    user_shards,
)
from chameleon.data.manifest import (
    Counts,
    ForgetSource,
    GroupCalibration,
    GroupEntry,
    ModelInfo,
    RunManifest,
)
from chameleon.data.user_shards import user_shard_tensors
from chameleon.job import compose
from chameleon.job.reduce import Reduced
from chameleon.job.reduce_stream import reduce_partitions

Calibrate = Callable[[Reduced, pa.Table], list[Calibration]]
"""(reduced, profiles) -> one Calibration per group, in group order."""


class JobFailedError(RuntimeError):
    """The job ran but produced no run: too many failed users, or partitions that never finished."""


def _user_shard_tensors(reduced: Reduced, rows: slice, cfg: ChameleonConfig) -> dict[str, torch.Tensor]:
    """The users' own edits of one shard, through the run's one user-shard codec."""
    users, site = reduced.users, cfg.subspace.site
    tensors = user_shard_tensors(
        [reduced.user_edit(i, cfg.edit, site) for i in range(rows.start, rows.stop)],
        ccs_loss=users.sub.ccs_loss[rows],
        has_edit=users.has_edit[rows],
        n_pairs_kept=users.keep[rows].sum(1),
    )
    if cfg.edit.composition == "residual":  # the user's own part, beside the composed row
        own = [compose.user_parts(reduced, i, cfg.edit)[3] for i in range(rows.start, rows.stop)]
        tensors["user_steer"] = torch.stack(own)[:, None].contiguous()
    return tensors


def user_markers(profiles: pa.Table, user_ids: Sequence[str], markers: Sequence[str]) -> list[list[str]]:
    """Per user (in `user_ids` order): which of `markers` the user's history shows (the
    synthesis' `marker_shares`, `core.markers.history_shows`); [] for runs made without them."""
    if "marker_shares" not in profiles.column_names:
        return [[] for _ in user_ids]
    shares = column_matrix(profiles, "marker_shares")
    row = {u: i for i, u in enumerate(profiles.column("user_id").to_pylist())}
    out = []
    for u in user_ids:
        shows = history_shows(dict(zip(MARKERS, shares[row[u]].tolist(), strict=True)))
        out.append([m for m in markers if shows[m]])
    return out


def assignments_table(reduced: Reduced, markers: Sequence[Sequence[str]] | None = None) -> pa.Table:
    """user_id → group_id, distance, how assigned, where the user's own edit is stored, and the
    markers its marker part adds (with marker parts)."""
    data, users, grouping = reduced.data, reduced.users, reduced.grouping
    n = len(data.user_ids)
    extra = (
        {} if markers is None else {"markers": pa.array([list(m) for m in markers], pa.list_(pa.string()))}
    )
    return pa.table(
        {
            "user_id": pa.array(data.user_ids, pa.string()),
            "group_id": pa.array([grouping.group_ids[i] for i in grouping.labels.tolist()], pa.string()),
            "distance": pa.array(grouping.distance.tolist(), pa.float32()),
            "assigned_by": pa.array(grouping.assigned_by, pa.string()),
            "user_shard": pa.array([i // USER_SHARD_SIZE for i in range(n)], pa.int32()),
            "user_row": pa.array([i % USER_SHARD_SIZE for i in range(n)], pa.int32()),
            "has_user_edit": pa.array(users.has_edit.tolist(), pa.bool_()),
            "n_pairs_kept": pa.array(users.keep.sum(1).tolist(), pa.int32()),
            **extra,
        }
    )


def write_edits(
    writer: RunWriter, reduced: Reduced, cfg: ChameleonConfig, markers: Sequence[Sequence[str]] | None = None
) -> list[GroupEntry]:
    """Write user shards, group edits, calibration, centroids, the marker directions and
    assignments (with each user's `markers` when the run has marker parts); returns the groups'
    manifest entries."""
    for key, rows in user_shards(len(reduced.data.user_ids)):
        meta = {"user_ids": json.dumps(reduced.data.user_ids[rows])}
        writer.put_safetensors(key, _user_shard_tensors(reduced, rows, cfg), meta)
    grouping, groups = reduced.grouping, reduced.groups
    groups_meta = []
    for j, gid in enumerate(grouping.group_ids):
        edit = reduced.group_edit(j, cfg.edit, cfg.subspace.site)
        rank = groups.rank[j, reduced.group_layers[j]]
        tensors = {**edit.to_tensors(), "rank": rank, "ccs_loss": groups.ccs_loss[j]}
        if cfg.edit.composition == "residual":  # the parts of the composed row, each [1, d]
            _, shared, residual = compose.group_parts(reduced, j, cfg.edit)
            tensors |= {"global_steer": shared[None].contiguous(), "group_steer": residual[None].contiguous()}
        # n_users: the users whose pairs entered this edit (members without pairs do not count).
        meta = {
            "group_id": gid,
            "n_users": str(grouping.contributors[j]),
            "n_members": str(grouping.sizes[j]),
            "n_pairs": str(int(groups.n_pairs[j])),
        }
        writer.put_safetensors(group_key(gid), tensors, meta)
        cal = reduced.group_calibration[j] if reduced.group_calibration else None
        groups_meta.append(
            GroupEntry(
                group_id=gid,
                n_users=grouping.contributors[j],
                n_members=grouping.sizes[j],
                n_pairs=int(groups.n_pairs[j]),
                layers=edit.layers,
                rank=rank.tolist(),
                form=edit.form,
                calibration=GroupCalibration(**cal.summary()) if cal is not None else None,
            )
        )
    if reduced.group_calibration:
        curves = {
            gid: cal.to_dict() for gid, cal in zip(grouping.group_ids, reduced.group_calibration, strict=True)
        }
        writer.put_json(CALIBRATION, curves)
    writer.put_safetensors(
        CENTROIDS,
        {"history_centroids": grouping.history_centroids.contiguous()},
        {"group_ids": json.dumps(grouping.group_ids)},
    )
    parts = reduced.marker_parts
    if parts is not None:
        writer.put_safetensors(
            MARKER_DIRECTIONS,
            {m: d.float().contiguous() for m, d in parts.directions.items()},
            {"layers": json.dumps(parts.layers)},
        )
    writer.put_parquet(ASSIGNMENTS, assignments_table(reduced, markers if parts is not None else None))
    return groups_meta


def marker_parts_manifest(
    reduced: Reduced, cfg: ChameleonConfig, markers: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """`marker_parts` (runs with marker parts only): the markers, layers and strength, how many
    queries the directions are the mean over, and how many users each marker's part reaches."""
    parts = reduced.marker_parts
    if parts is None:
        return {}
    return {
        "marker_parts": {
            "markers": list(parts.directions),
            "layers": parts.layers,
            "strength": cfg.edit.marker_strength,
            "n_queries": parts.n_queries,
            "users": {m: sum(m in ms for ms in markers) for m in parts.directions},
        }
    }


def edit_parts_manifest(reduced: Reduced, cfg: ChameleonConfig) -> dict[str, Any]:
    """`edit_parts` (residual composition only): the global edit's layer and calibration, and how
    many users have their own calibrated residual strength."""
    if cfg.edit.composition != "residual":
        return {}
    slot = compose.global_slot(reduced)
    cal = reduced.global_calibration
    return {
        "edit_parts": {
            "composition": "residual",
            "layer": reduced.layers[slot],
            "global_calibration": cal.to_dict() if cal is not None else None,
            "users_with_own_strength": len(reduced.user_strengths),
            "global_from": "shared_pairs" if reduced.shared_steer is not None else "style_pairs",
        }
    }


def check_users_accounted(
    expected: Sequence[str], mapped: Sequence[str], failed: Sequence[str], run_id: str
) -> None:
    """The invariant before publishing: every accepted user is mapped or failed, exactly once,
    and nobody else is (`JobFailedError` naming the users otherwise)."""
    seen = Counter([*mapped, *failed])
    problems = []
    duplicated = sorted(u for u, n in seen.items() if n > 1)
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    for what, ids in (("more than once", duplicated), ("missing", missing), ("not in the input", extra)):
        if ids:
            problems.append(f"{len(ids)} users {what} (e.g. {ids[:3]})")
    if problems:
        raise JobFailedError(
            f"run {run_id}'s partitions do not account for the accepted users exactly once: "
            f"{'; '.join(problems)}; nothing was published (rerun with --restart to map them again)"
        )


def reduce_and_publish(
    writer: RunWriter,
    *,
    cfg: ChameleonConfig,
    layers: Sequence[int],
    fingerprint: ModelFingerprint,
    n_partitions: int,
    counts: dict[str, int],
    timings: dict[str, float],
    max_user_failures: float = 1.0,
    calibrate: Calibrate | None = None,
    expected_user_ids: Sequence[str] | None = None,
    failure_note: str = "",
    job_spec: dict[str, Any] | None = None,
    forget: ForgetSource | None = None,
    set_latest: bool = True,
) -> RunManifest:
    """Reduce every partition of the run, group, calibrate, and publish; returns the committed manifest.

    Refuses (`JobFailedError`, nothing published) when more than `max_user_failures` of the
    accepted users failed in the map stage, counted over every partition, adopted ones included.
    `calibrate(reduced, profiles)` (a model replica's work) chooses each group's layer and
    strength when the edit form is additive and `edit.calibrate` is set; without it the edits use
    `edit.strength` at the layers the reduce chose. With `expected_user_ids` (the accepted users)
    the partitions must account for each exactly once (`check_users_accounted`). `failure_note`
    is added to the failure-limit error; `job_spec` (what a job run was made from) and `forget`
    (what a forget run was copied from) go into the manifest; `set_latest=False` commits without
    moving `latest`.
    """
    # Partition by partition: the driver holds per-user results and the groups' pair samples only.
    reduced, profiles, failures = reduce_partitions(writer, n_partitions, cfg, layers, timings)
    if expected_user_ids is not None:
        mapped = profiles.column("user_id").to_pylist() if profiles is not None else []
        check_users_accounted(expected_user_ids, mapped, [f["user_id"] for f in failures], writer.run_id)
    accepted = counts.get("accepted") or (len(profiles) if profiles is not None else 0) + len(failures)
    if failures and len(failures) / accepted > max_user_failures:
        raise JobFailedError(
            f"{len(failures)} of {accepted} users failed in the map stage (limit {max_user_failures:.0%}"
            f"{'; ' + failure_note if failure_note else ''}); see runs/{writer.run_id}/failures/ "
            "(partitions whose users all failed are mapped again by a rerun with the same run id)"
        )
    if reduced is None:
        raise JobFailedError(
            f"the map stage produced no pairs for any user (see runs/{writer.run_id}/failures/)"
        )
    if cfg.edit.composition == "residual":
        reduced.shared_steer = compose.shared_steer(profiles, len(layers))
    if calibrate is not None and cfg.edit.form != "projection" and cfg.edit.calibrate:
        t_cal = time.perf_counter()
        reduced.group_calibration = calibrate(reduced, profiles)
        timings["calibrate_s"] = time.perf_counter() - t_cal
    markers = user_markers(profiles, reduced.data.user_ids, cfg.edit.markers)
    t0 = time.perf_counter()
    groups_meta = write_edits(writer, reduced, cfg, markers)
    timings["publish_s"] = time.perf_counter() - t0
    manifest = RunManifest(
        model=ModelInfo(
            id=cfg.model.name_or_path, revision=cfg.model.revision, fingerprint=fingerprint.to_dict()
        ),
        hidden_size=fingerprint.hidden_size,
        captured_layers=list(layers),
        site=cfg.subspace.site,
        max_rank=cfg.subspace.max_rank,
        edit=cfg.edit.model_copy(),
        prompt_version=prompts.PROMPT_VERSION,
        groups=groups_meta,
        min_contributors=cfg.groups.min_contributors,
        unpublished_groups=reduced.grouping.unpublished,
        user_shards=[key for key, _ in user_shards(len(reduced.data.user_ids))],
        counts=Counts(
            **counts,
            users_mapped=len(reduced.data.user_ids),
            users_failed=len(failures),
            users_with_edit=int(reduced.users.has_edit.sum()),
            groups=len(reduced.grouping.group_ids),
            groups_unpublished=len(reduced.grouping.unpublished),
            pairs=int(reduced.data.mask.sum()),
            pairs_kept=int(reduced.users.keep.sum()),
        ),
        timings_s={k: round(v, 3) for k, v in timings.items()},
        config=cfg.model_dump(),
        job_spec=job_spec,
        forget=forget,
        **edit_parts_manifest(reduced, cfg),
        **marker_parts_manifest(reduced, cfg, markers),
    )
    return writer.commit(manifest, set_latest=set_latest)
