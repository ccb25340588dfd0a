"""Style measures: an answer in the user's style scores closer to the user's history than a plain one."""

from __future__ import annotations

import pytest

from chameleon.core.style import (
    FEATURES,
    assistant_talk,
    char_ngrams,
    feature_distance,
    style_features,
    style_similarity,
)

SHOUTY = ["OMG BEST GAME EVER!!!", "CANT WAIT FOR FRIDAY!!!", "SO HYPED RN!!!"]
LOWER = ["omg so tired lol", "cant sleep again lol", "soooo bored rn lol"]


def test_style_similarity_prefers_the_users_own_style():
    assert style_similarity("WHAT A NIGHT!!!", SHOUTY) > style_similarity("What a night.", SHOUTY)
    assert style_similarity("sooo hungry lol", LOWER) > style_similarity("I am very hungry.", LOWER)
    assert style_similarity("", SHOUTY) == 0.0 and style_similarity("x", []) == 0.0
    assert 0.0 <= style_similarity("anything at all", LOWER) <= 1.0


def test_char_ngrams_keep_case_and_collapse_spaces():
    grams = char_ngrams("Ab  c", 2, 2)
    assert grams == {"Ab": 1, "b ": 1, " c": 1}


def test_features_and_their_distance():
    f = style_features("@bob check https://x.y #fun soooo good!!! :)")
    named = dict(zip(FEATURES, f, strict=True))
    for k in ("mentions", "urls", "hashtags", "elongations", "punct_runs", "emoticons"):
        assert named[k] > 0, k
    assert named["starts_lowercase"] == 0.0  # starts with "@"
    assert feature_distance("soooo tired lol", LOWER) < feature_distance("I AM VERY TIRED.", LOWER)


@pytest.mark.parametrize(
    ("answer", "talks"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("Here is the paraphrased tweet: going home", True),
        ("The original tweet is about football.", True),
        ("going home now, so tired", False),
        ("sure is cold today", False),
    ],
)
def test_assistant_talk(answer, talks):
    assert assistant_talk(answer) is talks


def test_features_count_what_the_markers_count_and_nothing_inside_words():
    def feature(text: str, name: str) -> float:
        return float(style_features(text)[FEATURES.index(name)])

    # "xp" in "experience", "8)" in "item 8)", a 1000's zeros: not emoticons or elongations.
    assert feature("an experience worth 1000 words (item 8)", "emoticons") == 0
    assert feature("an experience worth 1000 words (item 8)", "elongations") == 0
    assert (
        feature("so good :) sooo good", "emoticons") > 0
        and feature("so good :) sooo good", "elongations") > 0
    )
    assert feature("wait... what?!", "punct_runs") > 0 and feature("we are #1 or #winning", "hashtags") > 0
