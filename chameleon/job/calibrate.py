"""The job's calibration stage: each group's layer and strength from its members' held-out texts.

Runs after the reduce (it needs the groups' directions) and before publishing, on a model
replica: in process for the local driver, on the actor pool for the Ray driver (one item per
group). The held-out items were set aside by the map stage (`profiles.heldout_*`); a group scores
a seeded sample of its members' items, so its cost does not grow with its size.

With `edit.composition: residual` calibration runs in two rounds (`calibrate_reduced`): the
global edit's layer and strength on a sample of every user's held-out items, then each group's
residual strength at that layer with the global edit applied under every candidate (strength 0 =
the global edit alone), and inside the same task each member's own residual strength on the
member's own held-out items (members with at least `edit.user_calibration_items` of them).
Which queries the held-out items carry is the synthesis' choice: the `style` pair source asks
them with their neutral rendering, so no candidate is rewarded for copying the query.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from chameleon.config import ChameleonConfig
from chameleon.core.calibration import Calibration, UnitItems, choose, nll_curve, unit_curves
from chameleon.core.devices import batch_size_for
from chameleon.core.generation import chat_prompt
from chameleon.core.marker_steering import MarkerParts, default_marker_layers, instruction_directions
from chameleon.core.model import model_device, num_layers
from chameleon.job import compose
from chameleon.job.reduce import Reduced

log = logging.getLogger(__name__)


@dataclass
class GroupCalibrationTask:
    """What one group's calibration needs: candidate layers, directions and norms there, examples."""

    group_id: str
    layers: list[int]
    directions: torch.Tensor
    """[n, d] unit directions at `layers`"""
    norms: torch.Tensor
    """[n] typical state norms at `layers`"""
    queries: list[str]
    texts: list[str]
    offset: torch.Tensor | None = None
    """Residual composition: [d] the shared edit under every candidate (one layer)."""
    members: list[MemberItems] = field(default_factory=list)
    """Residual composition: members whose own residual strength is calibrated in this task."""


@dataclass
class MarkerTask:
    """What the run's marker directions (`edit.markers`) need: the markers, the layers (empty:
    the model's default marker layers) and a sample of held-out queries to instruct."""

    markers: list[str]
    layers: list[int]
    queries: list[str]


@dataclass
class MemberItems:
    """One member's own residual direction and norm at the task's layer, and its held-out items."""

    user_id: str
    direction: torch.Tensor
    norm: float
    queries: list[str]
    texts: list[str]


@dataclass(frozen=True)
class ReplicaWork:
    """How the calibration stage reaches a model replica: in process, or over the job's actor
    pool (`ray_job.calibrate_on_ray`)."""

    calibrate: Callable[[Sequence[GroupCalibrationTask]], list[Calibration]]
    """`calibrate_task` for each task, results in task order."""
    marker_directions: Callable[[MarkerTask], MarkerParts]
    """`derive_marker_parts` for the run's one marker task."""


def _heldout_by_user(profiles: pa.Table) -> dict[str, list[tuple[str, str]]]:
    by_user: dict[str, list[tuple[str, str]]] = {}
    for uid, qs, ts in zip(
        profiles.column("user_id").to_pylist(),
        profiles.column("heldout_query").to_pylist(),
        profiles.column("heldout_text").to_pylist(),
        strict=True,
    ):
        by_user[uid] = list(zip(qs or [], ts or [], strict=True))
    return by_user


def global_task(reduced: Reduced, profiles: pa.Table, cfg: ChameleonConfig) -> GroupCalibrationTask:
    """The global edit's candidates: every captured layer, on a seeded sample of all users' items."""
    items = [item for items in _heldout_by_user(profiles).values() for item in items]
    random.Random(f"{cfg.subspace.seed}:global").shuffle(items)
    items = items[: cfg.edit.calibration_examples]
    direction, norms = compose.served_global(reduced)
    return GroupCalibrationTask(
        group_id="global",
        layers=list(reduced.layers),
        directions=direction.clone(),
        norms=norms.clone(),
        queries=[q for q, _ in items],
        texts=[t for _, t in items],
    )


def residual_tasks(reduced: Reduced, profiles: pa.Table, cfg: ChameleonConfig) -> list[GroupCalibrationTask]:
    """Per group: its residual at the global edit's layer, on top of the global edit; its members
    with enough held-out items of their own, for their own residual strengths."""
    slot, shared = compose.global_part(reduced, cfg.edit)
    unit = compose.residual_unit
    g_dir = reduced.global_steer[0][slot]
    by_user = _heldout_by_user(profiles)
    tasks = []
    for task, j in zip(
        calibration_tasks(reduced, profiles, cfg), range(len(reduced.grouping.group_ids)), strict=True
    ):
        members = []
        for i, uid in enumerate(reduced.data.user_ids):
            own = by_user.get(uid, [])
            if int(reduced.grouping.labels[i]) != j or not bool(reduced.users.has_edit[i]):
                continue
            if len(own) < cfg.edit.user_calibration_items:
                continue
            members.append(MemberItems(
                user_id=uid, direction=unit(reduced.user_steer[0][i, slot], g_dir),
                norm=float(reduced.user_steer[1][i, slot]), queries=[q for q, _ in own], texts=[t for _, t in own],
            ))  # fmt: skip
        task.layers = [reduced.layers[slot]]
        task.directions = unit(reduced.group_steer[0][j, slot], g_dir)[None].clone()
        task.norms = reduced.group_steer[1][j, slot][None].clone()
        task.offset = shared.clone()
        task.members = members
        tasks.append(task)
    return tasks


def marker_task(profiles: pa.Table, cfg: ChameleonConfig) -> MarkerTask | None:
    """The run's marker directions (`edit.markers`), from a seeded sample of every user's held-out
    queries; None when the run has no marker parts (none asked, an edit they cannot join, or no
    held-out query)."""
    if not cfg.edit.markers:
        return None
    if cfg.subspace.site != "residual":
        log.warning("edit.markers needs subspace.site: residual (got %r): no marker parts", cfg.subspace.site)
        return None
    queries = [q for items in _heldout_by_user(profiles).values() for q, _ in items]
    random.Random(f"{cfg.subspace.seed}:markers").shuffle(queries)
    if not queries:
        log.warning("no held-out queries to derive the marker directions from: no marker parts")
        return None
    return MarkerTask(
        markers=list(cfg.edit.markers),
        layers=list(cfg.edit.marker_layers or []),
        queries=queries[: cfg.edit.marker_examples],
    )


def derive_marker_parts(model, tok, task: MarkerTask, cfg: ChameleonConfig) -> MarkerParts:
    """The marker directions: what each marker's instruction changes in the model's states
    (`core.marker_steering.instruction_directions`); no layers on a model too shallow for them."""
    layers = task.layers or default_marker_layers(num_layers(model))
    if not layers:
        return MarkerParts(layers=[], directions={}, n_queries=0)
    directions = instruction_directions(
        model, tok, task.queries, task.markers, layers, system=cfg.synth.system_prompt,
        batch_size=batch_size_for(cfg.synth.batch_size, model_device(model)),
    )  # fmt: skip
    return MarkerParts(layers=layers, directions=directions, n_queries=len(task.queries))


def calibrate_reduced(
    work: ReplicaWork, reduced: Reduced, profiles: pa.Table, cfg: ChameleonConfig
) -> list[Calibration]:
    """Each group's calibration (what `Reduced.group_calibration` holds); with the residual
    composition also the global edit's (`reduced.global_calibration`, first round) and the
    members' own strengths (`reduced.user_strengths`); with `edit.markers` also the run's marker
    directions (`reduced.marker_parts`, on the same replicas)."""
    task = marker_task(profiles, cfg)
    if task is not None:
        parts = work.marker_directions(task)
        reduced.marker_parts = parts if parts.layers else None  # a model too shallow for them
    if cfg.edit.composition != "residual":
        return work.calibrate(calibration_tasks(reduced, profiles, cfg))
    reduced.global_calibration = work.calibrate([global_task(reduced, profiles, cfg)])[0]
    calibrations = work.calibrate(residual_tasks(reduced, profiles, cfg))
    reduced.user_strengths = {u: s for cal in calibrations for u, s in cal.members.items()}
    return calibrations


def calibration_tasks(
    reduced: Reduced, profiles: pa.Table, cfg: ChameleonConfig
) -> list[GroupCalibrationTask]:
    """One task per group: its edit's candidate layers and a seeded sample of its members' held-out items."""
    by_user = _heldout_by_user(profiles)
    direction, norms = reduced.group_steer
    tasks = []
    for j, gid in enumerate(reduced.grouping.group_ids):
        members = [
            u for u, g in zip(reduced.data.user_ids, reduced.grouping.labels.tolist(), strict=True) if g == j
        ]
        items = [item for u in members for item in by_user.get(u, [])]
        random.Random(f"{cfg.subspace.seed}:{gid}").shuffle(items)
        items = items[: cfg.edit.calibration_examples]
        slots = reduced.group_layers[j].tolist()
        tasks.append(
            GroupCalibrationTask(
                group_id=gid,
                layers=[reduced.layers[s] for s in slots],
                directions=direction[j, slots].clone(),
                norms=norms[j, slots].clone(),
                queries=[q for q, _ in items],
                texts=[t for _, t in items],
            )
        )
    return tasks


def calibrate_task(model, tok, task: GroupCalibrationTask, cfg: ChameleonConfig) -> Calibration:
    """Score every (layer, strength) candidate of one group on its held-out texts; keep the best.
    With members, each member's own residual strength on top of the group's choice."""
    if not task.texts:  # nothing held out: no evidence, so no edit
        return Calibration(layer=-1, strength=0.0, nll=float("nan"), base_nll=float("nan"), curve={})
    settings = {
        "strengths": cfg.edit.strengths,
        "site": cfg.subspace.site,
        "renorm": cfg.edit.form == "norm_preserving",
        "batch_size": batch_size_for(cfg.synth.batch_size, model_device(model)),
    }
    change: dict[str, float] = {}
    curve = nll_curve(
        model, tok, _prompts(tok, task.queries, cfg), task.texts, directions=task.directions, norms=task.norms,
        layers=task.layers, offset=task.offset, change=change, **settings,
    )  # fmt: skip
    calibration = choose(curve)
    calibration.change = change
    if task.members:  # each member's residual on top of the shared edit + the group's residual
        offset = task.offset + calibration.strength * float(task.norms[0]) * task.directions[0]
        units = [UnitItems(m.direction, m.norm, _prompts(tok, m.queries, cfg), m.texts) for m in task.members]
        curves = unit_curves(model, tok, units, layer=task.layers[0], offset=offset, **settings)
        for m, member_curve in zip(task.members, curves, strict=True):
            calibration.members[m.user_id] = choose(member_curve).strength
    return calibration


def _prompts(tok, queries: Sequence[str], cfg: ChameleonConfig) -> list[str]:
    return [chat_prompt(tok, q, cfg.synth.system_prompt) for q in queries]


def calibrate_in_process(
    model, tok, reduced: Reduced, profiles: pa.Table, *, cfg: ChameleonConfig
) -> list[Calibration]:
    work = ReplicaWork(
        calibrate=lambda tasks: [calibrate_task(model, tok, task, cfg) for task in tasks],
        marker_directions=lambda task: derive_marker_parts(model, tok, task, cfg),
    )
    return calibrate_reduced(work, reduced, profiles, cfg)
