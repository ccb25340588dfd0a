"""Metrics that see personalization (evaluation.attribution, .personalization, .style_goals,
.recompute, .report_style, .capacity) on hand-made users whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chameleon.core.marker_steering import MARKER_INSTRUCTIONS, instructed_prompts
from chameleon.evaluation import attribution, recompute
from chameleon.evaluation.capacity import marker_shares, readable_share
from chameleon.evaluation.personalization import (
    closeness_adjusted_gain,
    figures_from_per_user,
    per_user_table,
    personalization_results,
)
from chameleon.evaluation.report_style import CAPACITY_FILE, gain_label, personalization_section
from chameleon.evaluation.scoring import score_methods

# Six users with six distinct, recognisable styles (their unused history).
STYLES = [
    ["OMG BEST GAME EVER!!!", "CANT WAIT FOR FRIDAY!!!", "SO HYPED RIGHT NOW!!!"],
    ["sooo tired lol", "cant sleep again lol", "soooo bored lol"],
    ["Indeed, the lecture was rather illuminating.", "One must consider the evidence carefully."],
    ["arr matey the sea be rough", "ahoy, me hearties be sailin"],
    ["love this :) :)", "best day ever :D :)", "hugs <3 :)"],
    ["#monday #coffee #work", "#gym #fit #goals", "#food #yum"],
]
OWN = [
    "WHAT A NIGHT!!!",
    "sooo hungry lol",
    "Indeed, one must consider it.",
    "arr the sea be calm",
    ":) :) yay :)",
    "#sunday #chill",
]


# --------------------------------------------------------------------------- attribution


def test_candidate_sets_start_with_the_user_and_ignore_the_users_order():
    ids = [f"u{k}" for k in range(30)]
    cands = attribution.candidate_sets(ids, n_candidates=20, seed=3)
    for i, c in enumerate(cands):
        assert c[0] == i and len(c) == 20 and len(set(c)) == 20
    rev = attribution.candidate_sets(ids[::-1], n_candidates=20, seed=3)
    n = len(ids)
    for i in range(n):  # the same users, whatever order they come in
        assert {ids[j] for j in cands[i]} == {ids[::-1][j] for j in rev[n - 1 - i]}
    assert attribution.candidate_sets(ids, seed=4) != cands
    assert all(len(c) == 6 for c in attribution.candidate_sets(ids[:6]))  # all others when fewer
    with pytest.raises(ValueError):
        attribution.candidate_sets(["a", "a"])


def test_attribution_ranks_the_own_user_first_only_for_answers_in_the_users_style():
    ids = [f"u{k}" for k in range(6)]
    cands = attribution.candidate_sets(ids)
    own = attribution.attribution_ranks(OWN, STYLES, cands, ids)
    assert own == [1] * 6 and attribution.mrr(own) == 1.0 and attribution.top1(own) == 1.0
    swapped = attribution.attribution_ranks(OWN[1:] + OWN[:1], STYLES, cands, ids)
    assert all(r > 1 for r in swapped) and attribution.mrr(swapped) < 0.6


def test_ties_are_broken_by_a_seeded_draw_not_in_the_users_favour():
    ids = [f"u{k}" for k in range(200)]
    refs = [["same text"]] * 200
    cands = attribution.candidate_sets(ids)
    ranks = attribution.attribution_ranks([""] * 200, refs, cands, ids)  # every similarity is 0
    assert ranks == attribution.attribution_ranks([""] * 200, refs, cands, ids)
    assert set(ranks) <= set(range(1, 21))
    assert abs(attribution.top1(ranks) - 0.05) < 0.05
    assert abs(attribution.mrr(ranks) - attribution.chance_mrr(20)) < 0.05
    assert attribution.chance_mrr(20) == pytest.approx(0.17989, abs=1e-4)


# --------------------------------------------------------------------------- closeness-adjusted gain


def test_closeness_adjusted_gain_separates_copying_from_a_real_gain():
    rng = np.random.default_rng(0)
    dc = rng.normal(0.1, 0.1, 300)
    copying = closeness_adjusted_gain(0.4 * dc + rng.normal(0, 0.01, 300), dc)
    assert abs(copying["intercept"]) < 0.01 and not copying["above_zero"]
    assert copying["slope"] == pytest.approx(0.4, abs=0.02)
    assert copying["mean_d_rougeL"] > 0.03  # a clear ROUGE-L gain, all of it explained by closeness
    real = closeness_adjusted_gain(0.03 + 0.4 * dc + rng.normal(0, 0.01, 300), dc)
    assert real["intercept"] == pytest.approx(0.03, abs=0.005) and real["above_zero"]
    lo, hi = real["intercept_ci95"]
    assert lo < real["intercept"] < hi
    flat = closeness_adjusted_gain([0.1, 0.2, 0.3], [0.0, 0.0, 0.0])  # no closeness change: the mean
    assert flat["intercept"] == pytest.approx(0.2) and flat["slope"] == 0.0
    with pytest.raises(ValueError):
        closeness_adjusted_gain([0.1], [0.2])


def test_gain_label():
    gain = {"diff": 0.05, "diff_ci95": [0.02, 0.08]}
    assert gain_label(gain, {"above_zero": False}) == "format"
    assert gain_label(gain, {"above_zero": True}) == "personalization"
    assert gain_label({"diff": 0.01, "diff_ci95": [-0.01, 0.03]}, {"above_zero": True}) == "no gain"


# --------------------------------------------------------------------------- per_user and the figures


def _run(methods: dict[str, list[str]], refs=STYLES, inputs=None, golds=None):
    n = len(refs)
    ids = [f"7{k:03d}" for k in range(n)]
    golds = golds or ["a gold tweet"] * n
    inputs = inputs or ["a gold tweet here"] * n
    scores = score_methods(methods, golds, n_resamples=200, style_references=refs, inputs=inputs)
    return ids, scores, personalization_results(ids, refs, methods, scores, n_resamples=200)


def test_per_user_is_aligned_with_user_ids_and_holds_no_text():
    methods = {"base": ["Hello there."] * 6, "chameleon_group": OWN}
    ids, scores, res = _run(methods)
    pu = res["per_user"]
    assert pu["user_ids"] == ids
    assert pu["history_lower_start_share"] == pu["history_marker_shares"]["lower_start"]
    assert pu["history_lower_start_share"][1] == 1.0 and pu["history_lower_start_share"][0] == 0.0
    for m, e in pu["methods"].items():
        assert {"rougeL", "closeness", "attribution_rank", "lower_start"} <= set(e)
        assert all(len(v) == len(ids) for v in e.values())
        assert e["rougeL"] == scores[m]["per_user"]["rougeL"]
    assert pu["methods"]["chameleon_group"]["attribution_rank"] == [1] * 6
    assert pu["methods"]["chameleon_group"]["lower_start"] == [0, 1, 0, 1, 0, 0]
    text = json.dumps(pu)
    assert not any(t in text for t in (*OWN[:4], "Hello there", "gold tweet", *STYLES[0]))
    # Reordering the users reorders every vector the same way (ranks included).
    order = [3, 0, 5, 1, 4, 2]
    methods_r = {m: [a[i] for i in order] for m, a in methods.items()}
    refs_r = [STYLES[i] for i in order]
    ids_r = [ids[i] for i in order]
    scores_r = score_methods(
        methods_r,
        ["a gold tweet"] * 6,
        n_resamples=50,
        style_references=refs_r,
        inputs=["a gold tweet here"] * 6,
    )
    pu_r = per_user_table(ids_r, refs_r, methods_r, scores_r)
    for m in methods:
        for k, v in pu["methods"][m].items():
            assert pu_r["methods"][m][k] == [v[i] for i in order], (m, k)
    with pytest.raises(ValueError):
        per_user_table(ids, STYLES[:5], methods, scores)


def _lower_users_per_user(edit_lower: list[int], leak: list[int] | None = None) -> dict:
    """20 users, the first 10 writing lowercase; base never starts lowercase."""
    n = 20
    shows = [0.9] * 10 + [0.1] * 10
    zeros = [0] * n

    def method(lower):
        return {
            "rougeL": [0.3] * n,
            "closeness": [0.6] * n,
            "style": [0.3] * n,
            "attribution_rank": [10] * n,
            "lower_start": lower,
            **{mk: zeros for mk in ("lowercase_i", "punct_run", "elongation", "emoticon", "hashtag")},
        }

    return {
        "user_ids": [str(k) for k in range(n)],
        "history_lower_start_share": shows,
        "history_marker_shares": {
            mk: (shows if mk == "lower_start" else [0.0] * n)
            for mk in ("lower_start", "lowercase_i", "punct_run", "elongation", "emoticon", "hashtag")
        },
        "history_thresholds": {
            "lower_start": 0.7,
            "lowercase_i": 0.2,
            "punct_run": 0.2,
            "elongation": 0.2,
            "emoticon": 0.2,
            "hashtag": 0.2,
        },
        "attribution": {"n_candidates": 20, "seed": 0},
        "methods": {"base": method(zeros), "chameleon_group": method(edit_lower)},
    }


def test_marker_transfer_among_users_with_and_without_the_marker():
    targeted = _lower_users_per_user([1] * 10 + [0] * 10)
    figs = figures_from_per_user(targeted, n_resamples=200)
    e = figs["personalization"]["markers"]["lower_start"]
    assert (e["n_with"], e["n_without"]) == (10, 10)
    g = e["methods"]["chameleon_group"]
    assert g["with"]["share"] == 1.0 and g["without"]["share"] == 0.0
    assert g["with"]["vs_base"]["diff_ci95"][0] > 0 and g["without"]["vs_base"]["diff"] == 0
    assert "vs_chameleon_global" not in g["with"]  # not run: no comparison, no crash
    assert e["methods"]["base"]["with"]["share"] == 0.0
    row = figs["style_goals"]["marker_transfer"]
    assert row["met"] and row["transferred"] == ["chameleon_group:lower_start"]
    # Lowercase for everybody is a format change, not a transfer of the users' marker.
    blanket = figures_from_per_user(_lower_users_per_user([1] * 20), n_resamples=200)
    assert not blanket["style_goals"]["marker_transfer"]["met"]
    # No user carries it: nothing transferred.
    none = figures_from_per_user(_lower_users_per_user([0] * 20), n_resamples=200)
    assert not none["style_goals"]["marker_transfer"]["met"]


def test_goals_of_missing_methods_are_not_run_and_present_ones_are_judged():
    only_base = _lower_users_per_user([0] * 20)
    del only_base["methods"]["chameleon_group"]
    goals = figures_from_per_user(only_base, n_resamples=100)["style_goals"]
    assert all(
        not g["evaluated"] and g["met"] is None and g["figure"].startswith("not run") for g in goals.values()
    )

    pu = _lower_users_per_user([1] * 10 + [0] * 10)
    M = pu["methods"]
    rng = np.random.default_rng(1)
    M["chameleon_global"] = {**M["base"], "rougeL": list(0.35 + rng.normal(0, 0.01, 20))}
    M["chameleon_group"]["rougeL"] = list(0.36 + rng.normal(0, 0.01, 20))  # +20 % over base 0.3
    M["chameleon_group"]["closeness"] = [0.6] * 20
    M["chameleon_group"]["attribution_rank"] = [1] * 20
    M["random_residual"] = {**M["base"], "rougeL": list(np.asarray(M["chameleon_global"]["rougeL"]) * 0.9)}
    goals = figures_from_per_user(pu, n_resamples=200)["style_goals"]
    assert goals["group_rougeL_keeps_format_gain"]["met"]
    assert goals["specificity_attribution"]["met"]  # group ranks first, global at 10
    assert "chameleon_user vs swapped_residual" in goals["specificity_attribution"]["figure"]  # not run half
    assert goals["group_closeness_adjusted_gain"]["met"]  # the gain with no closeness change
    assert not goals["random_residual_within_5pct_of_global"]["met"]  # -10 %
    M["random_residual"]["rougeL"] = list(np.asarray(M["chameleon_global"]["rougeL"]) * 0.97)
    assert figures_from_per_user(pu, n_resamples=50)["style_goals"]["random_residual_within_5pct_of_global"][
        "met"
    ]
    M["chameleon_group"]["rougeL"] = list(0.32 + rng.normal(0, 0.01, 20))  # below global - 0.005
    assert not figures_from_per_user(pu, n_resamples=50)["style_goals"]["group_rougeL_keeps_format_gain"][
        "met"
    ]


def test_recompute_from_results_json_alone(tmp_path, capsys):
    methods = {"base": ["Hello there."] * 6, "chameleon_global": ["hello there"] * 6, "chameleon_group": OWN}
    _, scores, res = _run(methods)
    results = {
        "methods": {m: {"rougeL": e["rougeL"]} for m, e in scores.items()},
        "scoring": {"bootstrap": {"n_resamples": 200, "seed": 0}},
        **res,
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    loaded = json.loads(path.read_text())
    assert recompute.compare(loaded) == []
    assert recompute.main([str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "chameleon_group.attribution_mrr=1" in out and out[-1] == "figures_differing=0"
    assert any(line.startswith("goal.marker_transfer=") for line in out)
    # A stated figure that the per-user vectors do not give is caught.
    loaded["personalization"]["attribution"]["methods"]["base"]["mrr"] += 0.01
    loaded["methods"]["chameleon_group"]["rougeL"] += 0.001
    diffs = recompute.compare(loaded)
    assert len(diffs) == 2 and any("attribution" in d for d in diffs)
    path.write_text(json.dumps(loaded))
    assert recompute.main([str(path)]) == 1
    with pytest.raises(ValueError, match="per_user"):
        recompute.recompute({"methods": {}})


def test_served_marker_parts_are_scored_among_the_users_they_reach(tmp_path):
    # Users 4 and 5 get the emoticon part (the run's choice), user 4 alone also shows it in the
    # unused history; the group's answers carry an emoticon for users 4 and 5 only.
    methods = {"base": ["Hello there."] * 6, "chameleon_group": ["Hello."] * 4 + ["Hello :)", "Hi :)"]}
    parts = [[], [], [], [], ["emoticon"], ["emoticon"]]
    ids = [f"7{k:03d}" for k in range(6)]
    golds, inputs = ["a gold tweet"] * 6, ["a gold tweet here"] * 6
    scores = score_methods(methods, golds, n_resamples=200, style_references=STYLES, inputs=inputs)
    res = personalization_results(ids, STYLES, methods, scores, marker_parts=parts, n_resamples=200)
    assert res["per_user"]["marker_parts"] == parts
    served = res["personalization"]["served_markers"]
    assert list(served) == ["emoticon"] and (
        served["emoticon"]["n_with"],
        served["emoticon"]["n_without"],
    ) == (2, 4)
    group = served["emoticon"]["methods"]["chameleon_group"]
    assert group["with"]["share"] == 1.0 and group["without"]["share"] == 0.0
    assert group["with"]["readable_share"] == 0.0, "'Hello :)' and 'Hi :)' are too short to read as a style"
    assert group["with"]["vs_base"]["diff"] == 1.0
    # The issue's own marker transfer reads the unused history instead: only user 4 shows emoticons.
    assert res["personalization"]["markers"]["emoticon"]["n_with"] == 1
    results = {
        "methods": {m: {"rougeL": e["rougeL"]} for m, e in scores.items()},
        "scoring": {"bootstrap": {"n_resamples": 200, "seed": 0}},
        **res,
    }
    assert recompute.compare(json.loads(json.dumps(results))) == []
    assert recompute.headline(recompute.recompute(results))["chameleon_group.emoticon_share_reached"] == 1.0
    lines = "\n".join(personalization_section(results, tmp_path, ["base", "chameleon_group"]))
    assert "| emoticon (2/4) | `chameleon_group` | 100 % / 0 % | 0 % | +1.00 [" in lines
    # Without marker parts there is no such block (and older results.json files stay recomputable).
    _, _, plain = _run(methods)
    assert "served_markers" not in plain["personalization"] and "marker_parts" not in plain["per_user"]
    with pytest.raises(ValueError, match="marker parts"):
        personalization_results(ids, STYLES, methods, scores, marker_parts=parts[:5])


def test_report_section_rows(tmp_path):
    methods = {"base": ["Hello there."] * 6, "chameleon_group": OWN}
    _, scores, res = _run(methods)
    results = {
        "methods": {m: {k: v for k, v in e.items() if k != "per_user"} for m, e in scores.items()},
        **res,
    }
    lines = "\n".join(personalization_section(results, tmp_path, ["base", "chameleon_group"]))
    assert "| `chameleon_group` |" in lines and "attribution MRR" in lines
    for name in res["style_goals"]:
        assert f"| {name} |" in lines
    assert "| random_residual_within_5pct_of_global |" in lines and "not run" in lines
    assert "not measured beside this run" in lines
    cap = {
        "model": "m",
        "users": [0, 48],
        "gold": {"hashtag": 0.05},
        "capacity": {
            "markers": {
                "hashtag": {
                    "none": 0.0,
                    "by_placement": {"system": {"share": 0.1}, "user": {"share": 0.9}},
                    "capacity": 0.9,
                }
            }
        },
    }
    (tmp_path / CAPACITY_FILE).write_text(json.dumps(cap))
    lines = "\n".join(personalization_section(results, tmp_path, ["base", "chameleon_group"]))
    assert "| hashtag | 0 % | 10 % | 90 % | **90 %** | 5 % |" in lines
    assert personalization_section({"methods": {}}, tmp_path, []) == []


# --------------------------------------------------------------------------- capacity


def test_capacity_prompts_carry_the_instruction_where_asked():
    msgs, system = instructed_prompts(["tweet a"], "SYS", "hashtag", "system")
    assert msgs == ["tweet a"] and system == "SYS " + MARKER_INSTRUCTIONS["hashtag"]
    msgs, system = instructed_prompts(["tweet a"], "SYS", "hashtag", "user")
    assert msgs == ["tweet a\n\n" + MARKER_INSTRUCTIONS["hashtag"]] and system == "SYS"
    assert instructed_prompts(["tweet a"], "SYS", None, "user") == (["tweet a"], "SYS")
    shares = marker_shares(["#a :)", "Plain", "i think so..."])
    assert shares["hashtag"] == pytest.approx(1 / 3) and shares["punct_run"] == pytest.approx(1 / 3)
    assert shares["lower_start"] == pytest.approx(1 / 3) and shares["elongation"] == 0.0


def test_attribution_ignores_mentions_copied_from_the_input():
    ids = ["a", "b"]
    refs = [["@bobbyjones @bobbyjones ok.", "@bobbyjones fine."], ["yo wassup lol", "lol yo yo"]]
    answers = ["@bobbyjones fine.", "@bobbyjones @bobbyjones yo lol"]
    assert attribution.attribution_ranks(answers, refs, attribution.candidate_sets(ids), ids) == [1, 1]


def test_one_user_gives_figures_without_a_regression_line():
    pu = _lower_users_per_user([0] * 20)
    pu["user_ids"] = pu["user_ids"][:1]
    pu["history_lower_start_share"] = pu["history_lower_start_share"][:1]
    pu["history_marker_shares"] = {k: v[:1] for k, v in pu["history_marker_shares"].items()}
    for e in pu["methods"].values():
        for k in e:
            e[k] = e[k][:1]
    figs = figures_from_per_user(pu, n_resamples=20)
    assert figs["personalization"]["closeness_adjusted"] == {}
    assert not figs["style_goals"]["group_closeness_adjusted_gain"]["evaluated"]


def test_readable_share_counts_answers_that_carry_the_marker_and_stay_readable():
    answers = ["great day today :)", "🌟🌟🌟🌟", "great day today", "what a day :D"]
    assert readable_share(answers, "emoticon") == 0.5
    assert readable_share(answers, "hashtag") == 0.0
