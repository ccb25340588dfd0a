"""What the embedded model's residual edit can carry of each example writing style.

For every style (the demo's six and the real-world candidates), its pairs are its example texts:
raw text vs the neutral rendering (`core.normalize`), both after the LaMP-7 template around the
rendering, captured as the job captures the `style` pair source (answer-mean, residual stream).
Its residual direction is unit(style mean difference − the mean over all styles' pairs); it is
added at the last position, at `--strengths` × the layer's typical state norm, at each of
`--layers`, while the model paraphrases the demo's six neutral tweets. Printed per style: the
share of answers with the style's marker (`dev.demo_markers`) for the base model and for the best
(layer, strength) whose answers stay readable (mean ROUGE-L to the input ≥ `--min-closeness`), and
that gain; headline: the number of styles whose best readable edit carries the marker in more
answers than base.

    python jobs/bench/demo_capacity.py --out docs/results/demo-capacity.json
"""

from __future__ import annotations

import time

import torch
from common import TINY_MODEL, model_path, parse, parser, report

from chameleon.config import EMBEDDED_MODEL, ModelConfig
from chameleon.core.calibration import steering_edit
from chameleon.core.capture import capture
from chameleon.core.generation import chat_prompt, first_answer_line, generate_answers
from chameleon.core.model import load_model
from chameleon.core.normalize import neutralize
from chameleon.dev.demo import EXAMPLE_STYLES, NEUTRAL_TWEETS, OTHER_STYLES, PARAPHRASE
from chameleon.dev.demo_markers import MARKERS, has_marker
from chameleon.evaluation.metrics import rouge_per_item


def style_pairs(model, tok, texts: list[str], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, L, d] answer-mean states of raw and neutral texts after the template around the neutral one."""
    prompts = [chat_prompt(tok, PARAPHRASE.format(text=neutralize(t) or t)) for t in texts]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    answers = texts + [neutralize(t) or t for t in texts]
    states = capture(
        model, tok, [p + a for p, a in zip(prompts * 2, answers, strict=True)], layers, "residual",
        reduce="answer_mean", answer_starts=starts * 2,
    )  # fmt: skip
    return states[: len(texts)], states[len(texts) :]


SMOKE = {"model": TINY_MODEL, "layers": "1", "strengths": "0.2"}
"""`--smoke`: the tiny random model at one layer and one strength (seconds; figures mean nothing)."""


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--layers", default="9,12,15")
    p.add_argument("--strengths", default="0.1,0.2,0.4,0.8")
    p.add_argument("--min-closeness", type=float, default=0.3)
    args = parse(p, SMOKE)
    layers = [int(x) for x in args.layers.split(",")]
    strengths = [float(x) for x in args.strengths.split(",")]
    t0 = time.perf_counter()
    model, tok = load_model(ModelConfig(name_or_path=model_path(args.model)))
    styles = {**EXAMPLE_STYLES, **OTHER_STYLES}
    pairs = {s: style_pairs(model, tok, texts, layers) for s, texts in styles.items()}
    diffs = {s: (hp - hn).mean(0) for s, (hp, hn) in pairs.items()}  # [L, d]
    shared = torch.stack(list(diffs.values())).mean(0)
    norms = {s: ((hp.norm(dim=-1) + hn.norm(dim=-1)) / 2).mean(0) for s, (hp, hn) in pairs.items()}

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    residual = {s: unit(unit(diffs[s]) - unit(shared)) for s in styles}
    queries = [PARAPHRASE.format(text=t) for t in NEUTRAL_TWEETS]
    base = [first_answer_line(a) for a in generate_answers(model, tok, queries, max_new_tokens=40)]
    figures: dict = {}
    detail: dict = {"base_answers": base, "styles": {}}
    carried = 0
    for s in styles:
        rows, edits = [], []
        for li, layer in enumerate(layers):
            for st in strengths:
                e = steering_edit(
                    layer, residual[s][li], float(norms[s][li]), st, site="residual", renorm=False
                )
                rows += [(layer, st)] * len(queries)
                edits += [e] * len(queries)
        answers = [
            first_answer_line(a)
            for a in generate_answers(
                model, tok, queries * (len(rows) // len(queries)), edits=edits, max_new_tokens=40
            )
        ]
        base_share = sum(has_marker(s, a) for a in base) / len(base)
        best = (None, None, base_share, 1.0, base)
        points = {}
        for k in range(0, len(rows), len(queries)):
            layer, st = rows[k]
            got = answers[k : k + len(queries)]
            share = sum(has_marker(s, a) for a in got) / len(got)
            close = sum(rouge_per_item(got, NEUTRAL_TWEETS)["rougeL"]) / len(got)
            points[f"{layer}:{st:g}"] = {"marker_share": share, "closeness": round(close, 3), "answers": got}
            if close >= args.min_closeness and share > best[2]:
                best = (layer, st, share, close, got)
        gain = best[2] - base_share
        carried += gain > 0
        figures[f"{s}_base_share"] = base_share
        figures[f"{s}_best_share"] = best[2]
        figures[f"{s}_best_at"] = f"{best[0]}:{best[1]}" if best[0] is not None else "none"
        detail["styles"][s] = {"marker": MARKERS[s][0], "points": points, "best": best[:4]}
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    figures["styles_carried"] = carried
    report(figures, "styles_carried", args.out, {"detail": detail, "layers": layers, "strengths": strengths})


if __name__ == "__main__":
    main()
