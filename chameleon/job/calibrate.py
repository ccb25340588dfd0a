"""The job's calibration stage: each group's layer and strength from its members' held-out texts.

Runs after the reduce (it needs the groups' directions) and before publishing, on a model
replica: in process for the local driver, on the actor pool for the Ray driver (one item per
group). The held-out items were set aside by the map stage (`profiles.heldout_*`); a group scores
a seeded sample of its members' items, so its cost does not grow with its size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pyarrow as pa
import torch

from chameleon.config import ChameleonConfig
from chameleon.core.calibration import Calibration, choose, nll_curve
from chameleon.core.generation import chat_prompt
from chameleon.job.reduce import Reduced


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


def calibration_tasks(
    reduced: Reduced, profiles: pa.Table, cfg: ChameleonConfig
) -> list[GroupCalibrationTask]:
    """One task per group: its edit's candidate layers and a seeded sample of its members' held-out items."""
    by_user: dict[str, list[tuple[str, str]]] = {}
    for uid, qs, ts in zip(
        profiles.column("user_id").to_pylist(),
        profiles.column("heldout_query").to_pylist(),
        profiles.column("heldout_text").to_pylist(),
        strict=True,
    ):
        by_user[uid] = list(zip(qs or [], ts or [], strict=True))
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
    """Score every (layer, strength) candidate of one group on its held-out texts; keep the best."""
    if not task.texts:  # nothing held out: no evidence, so no edit
        return Calibration(layer=-1, strength=0.0, nll=float("nan"), base_nll=float("nan"), curve={})
    prompts = [chat_prompt(tok, q, cfg.synth.system_prompt) for q in task.queries]
    change: dict[str, float] = {}
    curve = nll_curve(
        model,
        tok,
        prompts,
        task.texts,
        directions=task.directions,
        norms=task.norms,
        layers=task.layers,
        strengths=cfg.edit.strengths,
        site=cfg.subspace.site,
        renorm=cfg.edit.form == "norm_preserving",
        batch_size=cfg.synth.batch_size,
        change=change,
    )
    calibration = choose(curve)
    calibration.change = change
    return calibration


def calibrate_in_process(
    model, tok, reduced: Reduced, profiles: pa.Table, *, cfg: ChameleonConfig
) -> list[Calibration]:
    return [calibrate_task(model, tok, task, cfg) for task in calibration_tasks(reduced, profiles, cfg)]
