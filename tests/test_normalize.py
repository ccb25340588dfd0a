"""The neutral rendering of informal writing (core.normalize): style goes, content stays."""

from __future__ import annotations

import pytest

from chameleon.core.normalize import neutralize
from chameleon.core.style import FEATURES, style_features


@pytest.mark.parametrize(
    ("raw", "neutral"),
    [
        ("i cant wait 2nite", "I can't wait tonight."),
        ("OMG I LOVE THIS!!!! soooo good :) #blessed", "Oh my god I love this! So good blessed."),
        ("@bob check http://x.co/abc it's great...", "Check it's great."),
        ("coool yaaay", "Cool yay."),
        ("rainy day vibes 🌧️📚🍵 staying in", "Rainy day vibes staying in."),
        ("lol u r right &amp; im wrong", "You are right & I'm wrong."),
        ("what?!?! no way", "What? No way."),
        ("The seminar addressed epistemology.", "The seminar addressed epistemology."),
    ],
)
def test_rules(raw, neutral):
    assert neutralize(raw) == neutral


def test_only_style_is_left_empty():
    assert neutralize("@someone :) lol") == ""
    assert neutralize("   ") == ""


def test_rendering_is_idempotent_and_keeps_content_words():
    raw = "omg the game last night was INSANE!!! best team ever #goteam"
    once = neutralize(raw)
    assert neutralize(once) == once
    for word in ("game", "last", "night", "insane", "best", "team", "goteam"):
        assert word in once.lower()


def test_markers_of_style_are_gone():
    raw = "sooo tired... @work again!!! #mondays :( lol"
    feats = dict(zip(FEATURES, style_features(neutralize(raw)), strict=True))
    for marker in ("punct_runs", "emoticons", "mentions", "hashtags", "elongations", "starts_lowercase"):
        assert feats[marker] == 0, marker
