"""Generation time with per-row edits (3 layers, 8 distinct groups in one batch of 8) over plain.

    python jobs/bench/edit_overhead.py [--model ID] [--tokens 32] [--trials 5] [--smoke] [--out FILE]

Both variants generate exactly the same number of tokens (min = max new tokens) from the same
prompts; trials alternate plain/edited so machine noise hits both alike. The ratio is the median
of per-trial ratios. Goal: edit_overhead_ratio <= 1.05.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import TINY_MODEL, model_path, parse, parser, report

from chameleon.config import EMBEDDED_MODEL, ModelConfig
from chameleon.core.edit import Edit, EditBank
from chameleon.core.generation import chat_prompt
from chameleon.core.model import hidden_size, load_model, model_device, num_layers
from chameleon.core.prompts import PARAPHRASE_TWEET

TWEETS = [
    "I am going to the beach.",
    "The game was great.",
    "Rainy morning again.",
    "New phone, who dis.",
    "Dinner was amazing.",
    "Long day at work.",
    "Reading a good book.",
    "Coffee first, then code.",
]
PROMPTS = [PARAPHRASE_TWEET + t for t in TWEETS]


def random_edits(n: int, layers: list[int], d: int, rank: int = 3, seed: int = 0) -> list[Edit]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        P = torch.linalg.qr(torch.randn(len(layers), d, rank, generator=g))[0].transpose(1, 2)
        N = torch.nn.functional.normalize(torch.randn(len(layers), d, generator=g), dim=-1)
        out.append(
            Edit(layers=layers, theta_p=P, theta_n=N, mean=0.01 * torch.randn(len(layers), d, generator=g))
        )
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--groups", type=int, default=8)
    args = parse(p, {"model": TINY_MODEL, "tokens": 4, "trials": 1, "groups": 2})
    model, tok = load_model(ModelConfig(name_or_path=model_path(args.model)))
    L = num_layers(model)
    layers = sorted({L // 4, L // 3, L // 2})
    bank = EditBank(hidden_size(model), layers, max_rank=3, device=model_device(model))
    rows = bank.add_many(random_edits(args.groups, layers, hidden_size(model)), alpha=0.5, beta=1.0)
    prompts = [chat_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(args.groups)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model_device(model))
    kw = dict(
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )

    def plain() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, **kw)
        return time.perf_counter() - t

    def edited() -> float:
        t = time.perf_counter()
        with torch.no_grad(), bank.apply(model, rows):
            model.generate(**enc, **kw)
        return time.perf_counter() - t

    plain(), edited()  # warm-up
    ratios, tp, te = [], [], []
    for _ in range(args.trials):
        a, b = plain(), edited()
        tp.append(a)
        te.append(b)
        ratios.append(b / a)
    figures = {
        "batch": args.groups,
        "distinct_groups": args.groups,
        "edited_layers": len(layers),
        "new_tokens": args.tokens,
        "plain_s_median": statistics.median(tp),
        "edited_s_median": statistics.median(te),
        "edit_overhead_ratio": statistics.median(ratios),
    }
    report(figures, "edit_overhead_ratio", args.out, {"model": args.model, "ratios": ratios})


if __name__ == "__main__":
    main()
