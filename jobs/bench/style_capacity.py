"""Style capacity of a model on LaMP-7 tuning users: the share of answers carrying each style marker
when the prompt asks for it outright (the ceiling any personalization can reach on that model).

    python jobs/bench/style_capacity.py [--users 0:48] [--derive-users 48:96] [--model ID]
        [--edit-layers 3,6,...] [--edit-strengths 0.1,0.2,...] [--lamp-dir DIR] [--out FILE] [--smoke]

The evaluation's prompt (no-preamble system turn, the LaMP input as the user turn), greedy, the
evaluation's answer clean-up; one instruction per marker (`core.marker_steering.MARKER_INSTRUCTIONS`)
appended to the system turn or after the user's message. Prints per marker the share without an
instruction, with it at each placement, and the capacity (the larger); the golds' share of the same
users beside it (what the users themselves write).

Then the same markers under an edit instead of an instruction (`evaluation.edit_capacity`): the
change each instruction makes to the residual stream at the prompt's last position, averaged over
the `--derive-users`' prompts, added at every layer of `--edit-layers` (default every third layer
from 3) at each of `--edit-strengths`, while the model answers the `--users`' inputs unasked.
Printed per marker: the largest share among the strengths whose answers keep a mean ROUGE-L to the
input tweet of at least `--min-closeness` (`{marker}_edit_capacity`) and that strength
(`{marker}_edit_at`, 0 when none beat no edit); `markers_carried_by_edit` counts the markers whose
share at that strength has its 95 % interval above the share without an edit.

Last, what a marker part chosen from each user's own history would transfer
(`measure_edit_transfer`): the `--transfer-users` whose LaMP profile shows a marker answer their
input unedited and under that marker's edit at the strength found above (markers whose edit beat
no edit only). Printed per marker: `{marker}_transfer_users`, `_base`, `_edited`, the paired gain
with its 95 % interval (`_gain`, `_gain_low`, `_gain_high`) and the edited answers' closeness.
`--transfer-users ''` skips it.

Every share has a readable twin (`_asked_readable`, `_edit_readable`, `_transfer_*_readable`): the
share of answers that carry the marker AND keep at least three words besides their markers
(`core.markers.readable`); `markers_readable_when_asked` counts the markers whose readable share
rises when asked. A small model can carry a marker only as a degenerate answer ("🌟🌟🌟…").

Only tuning users (positions < 500) are accepted. The headline counts the markers whose instructed
share's 95 % interval lies above the share without instruction. The JSON (`--out`) holds figures
and shares only, no LaMP text. `--smoke`: the tiny random model on three built-in tweets (no LaMP
data), 4 new tokens: checks the script only.
"""

from __future__ import annotations

import time

import torch
from common import TINY_MODEL, model_path, parse, parser, report

from chameleon.config import EMBEDDED_MODEL, ModelConfig
from chameleon.core.markers import MARKERS
from chameleon.core.model import load_model
from chameleon.core.prompts import PARAPHRASE_TWEET
from chameleon.evaluation.capacity import PLACEMENTS, marker_shares, measure_capacity
from chameleon.evaluation.edit_capacity import Answering, measure_edit_capacity, measure_edit_transfer
from chameleon.evaluation.lamp import N_TUNING, load_lamp7, profile_texts
from chameleon.evaluation.split import parse_range

SMOKE_TWEETS = ["Great game tonight!", "so tired of this rain", "New phone, who dis."]
SMOKE_HISTORIES = [["lol :)", "yay :D"], ["#rain again", "#tired"], ["ok.", "fine."]]


def _questions(args, users: str) -> tuple[list[str], list[str] | None, list[list[str]]]:
    """The LaMP inputs, golds and whole profiles of the tuning users asked for (smoke: built-in
    tweets and histories, no golds)."""
    if args.smoke:
        return [PARAPHRASE_TWEET + t for t in SMOKE_TWEETS], None, SMOKE_HISTORIES
    lo, hi = parse_range(users)
    if hi > N_TUNING:
        raise SystemExit(f"{users}: only tuning users (positions < {N_TUNING}) may be used here")
    questions, golds = load_lamp7(args.lamp_dir)
    qs = questions[lo:hi]
    return [q.input for q in qs], [golds[q.id] for q in qs], [profile_texts(q) for q in qs]


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--users", default="0:48", help="LaMP-7 file positions START:END (tuning users only)")
    p.add_argument(
        "--derive-users",
        default="48:96",
        help="positions whose prompts give the edit directions (tuning only)",
    )
    p.add_argument(
        "--edit-layers", default=None, help="layers the edit touches (default: every third from 3)"
    )
    p.add_argument("--edit-strengths", default="0.1,0.2,0.25,0.3,0.4")
    p.add_argument("--min-closeness", type=float, default=0.5, help="readable: mean ROUGE-L to the input")
    p.add_argument(
        "--transfer-users",
        default="100:400",
        help="positions whose history picks a marker part (tuning only; '' skips)",
    )
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--lamp-dir", default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parse(p, {"model": TINY_MODEL, "max_new_tokens": 4, "edit_strengths": "0.5"})
    if args.threads:
        torch.set_num_threads(args.threads)
    messages, golds, _ = _questions(args, args.users)
    derive = _questions(args, args.derive_users)[0]
    if not args.smoke:  # each set of users serves one purpose, so no figure replays its own choice
        sets = [args.users, args.derive_users] + ([args.transfer_users] if args.transfer_users else [])
        ranges = [set(range(*parse_range(u))) for u in sets]
        if any(a & b for i, a in enumerate(ranges) for b in ranges[i + 1 :]):
            raise SystemExit("--users, --derive-users and --transfer-users must not overlap")
    model, tok = load_model(ModelConfig(name_or_path=model_path(args.model)))
    n_layers = model.config.num_hidden_layers
    layers = (
        [int(x) for x in args.edit_layers.split(",")]
        if args.edit_layers
        else list(range(3, n_layers, 3)) or [0]
    )
    answering = Answering(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    t0 = time.perf_counter()
    res = measure_capacity(
        model, tok, messages, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    edit = measure_edit_capacity(
        model, tok, derive, messages, layers=layers,
        strengths=[float(x) for x in args.edit_strengths.split(",")], min_closeness=args.min_closeness,
        answering=answering,
    )  # fmt: skip
    chosen = {m: e["at"] for m, e in edit["markers"].items() if e["at"] is not None}
    if args.smoke:  # the tiny model's answers are unreadable: measure at the smoke strength
        chosen = {"emoticon": float(args.edit_strengths.split(",")[0])}
    transfer = {}
    if args.transfer_users and chosen:
        t_messages, _, t_histories = _questions(args, args.transfer_users)
        transfer = measure_edit_transfer(
            model, tok, t_messages, t_histories, layers=layers, directions=edit["directions"],
            strengths=chosen, answering=answering,
        )  # fmt: skip
    wall = time.perf_counter() - t0
    gold = marker_shares(golds) if golds else {m: None for m in MARKERS}
    figures: dict = {}
    above = readable_asked = 0
    for m in MARKERS:
        e = res["markers"][m]
        figures[f"{m}_none"] = e["none"]
        for pl in PLACEMENTS:
            figures[f"{m}_asked_{pl}"] = e["by_placement"][pl]["share"]
        figures[f"{m}_capacity"] = e["capacity"]
        figures[f"{m}_asked_readable"] = e["readable_capacity"]
        readable_asked += e["readable_capacity"] > e["readable_none"]
        if gold[m] is not None:
            figures[f"{m}_gold"] = gold[m]
        above += any(v["ci95"][0] > e["none"] for v in e["by_placement"].values())
    carried = 0
    for m in MARKERS:
        e = edit["markers"][m]
        figures[f"{m}_edit_capacity"] = e["capacity"]
        figures[f"{m}_edit_at"] = e["at"] or 0
        figures[f"{m}_edit_readable"] = e["readable_capacity"]
        if e["at"] is not None:
            figures[f"{m}_edit_closeness"] = e["by_strength"][f"{e['at']:g}"]["closeness"]
            carried += e["by_strength"][f"{e['at']:g}"]["ci95"][0] > edit["none"]["shares"][m]
    figures["closeness_without_edit"] = edit["none"]["closeness"]
    for m, t in transfer.items():
        figures[f"{m}_transfer_users"] = t["users"]
        if t["users"]:
            figures[f"{m}_transfer_base"] = t["base_share"]
            figures[f"{m}_transfer_edited"] = t["edited_share"]
            figures[f"{m}_transfer_base_readable"] = t["base_readable_share"]
            figures[f"{m}_transfer_edited_readable"] = t["edited_readable_share"]
            figures[f"{m}_transfer_gain"] = t["paired_gain"]["mean"]
            figures[f"{m}_transfer_gain_low"] = t["paired_gain"]["ci95"][0]
            figures[f"{m}_transfer_gain_high"] = t["paired_gain"]["ci95"][1]
            figures[f"{m}_transfer_base_closeness"] = t["base_closeness"]
            figures[f"{m}_transfer_edited_closeness"] = t["edited_closeness"]
    figures["markers_carried_by_edit"] = carried
    figures["n_users"] = len(messages)
    figures["wall_s"] = round(wall, 1)
    figures["markers_readable_when_asked"] = readable_asked
    figures["markers_above_none_when_asked"] = above
    res.pop("answers")
    edit.pop("answers")
    edit.pop("directions")
    report(
        figures,
        "markers_above_none_when_asked",
        args.out,
        extra={
            "model": args.model,
            "users": None if args.smoke else list(parse_range(args.users)),
            "derive_users": None if args.smoke else list(parse_range(args.derive_users)),
            "max_new_tokens": args.max_new_tokens,
            "gold": gold,
            "capacity": res,
            "edit_capacity": edit,
            "transfer_users": list(parse_range(args.transfer_users))
            if args.transfer_users and not args.smoke
            else None,
            "edit_transfer": transfer,
        },
    )


if __name__ == "__main__":
    main()
