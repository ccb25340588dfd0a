"""Calibration of members' own residual strengths: one unit at a time vs in shared batches.

    python jobs/bench/calibration_speed.py [--model ID] [--units 48] [--items 4] [--threads 2]
                                           [--smoke] [--out FILE]

Each unit (a member of a group with held-out items of its own) has a random direction; its
candidates (`edit.strengths` on top of a fixed offset, the shared edit) are scored by
`core.calibration.nll_curve` one unit at a time, then by `unit_curves` with every unit's items in
shared batches (each answer under its own unit's row), on the same prompts and texts.

    per_unit_s                 every unit's curve, one unit at a time
    shared_batches_s           every unit's curve in shared batches
    max_abs_nll_diff           the largest difference between the two of any curve entry (goal < 1e-4)
    member_calibration_speedup per_unit_s / shared_batches_s
"""

from __future__ import annotations

import time

import torch
from common import TINY_MODEL, model_path, parse, parser, report

from chameleon.config import EMBEDDED_MODEL, ModelConfig
from chameleon.core.calibration import UnitItems, nll_curve, unit_curves
from chameleon.core.generation import chat_prompt
from chameleon.core.model import load_model

TEXTS = [
    "omg the weather is sooo nice today!!",
    "home at last lol, what a day",
    "i love this song so much #music",
    "cannot wait for the weekend :)",
]
STRENGTHS = [0.05, 0.1, 0.2, 0.3]


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--units", type=int, default=48, help="members whose own strength is calibrated")
    p.add_argument("--items", type=int, default=4, help="held-out items per member")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parse(p, {"model": TINY_MODEL, "units": 6})
    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name_or_path=model_path(args.model)))
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    units = [
        UnitItems(
            torch.randn(d, generator=g),
            3.0,
            [chat_prompt(tok, f"Write a tweet about topic {i}, take {j}.") for j in range(args.items)],
            [TEXTS[(i + j) % len(TEXTS)] for j in range(args.items)],
        )
        for i in range(args.units)
    ]
    offset = torch.randn(d, generator=g)
    settings = {"strengths": STRENGTHS, "site": "residual", "offset": offset, "batch_size": args.batch_size}
    t0 = time.perf_counter()
    alone = [
        nll_curve(model, tok, u.prompts, u.answers, directions=u.direction[None], norms=torch.tensor([u.norm]),
                  layers=[args.layer], **settings)
        for u in units
    ]  # fmt: skip
    per_unit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = unit_curves(model, tok, units, layer=args.layer, **settings)
    shared_s = time.perf_counter() - t0
    figures = {
        "model": args.model,
        "units": args.units,
        "items_per_unit": args.items,
        "per_unit_s": per_unit_s,
        "shared_batches_s": shared_s,
        "max_abs_nll_diff": max(abs(a[k] - b[k]) for a, b in zip(alone, together, strict=True) for k in a),
        "member_calibration_speedup": per_unit_s / shared_s,
    }
    report(figures, "member_calibration_speedup", args.out, {"smoke": args.smoke})


if __name__ == "__main__":
    main()
