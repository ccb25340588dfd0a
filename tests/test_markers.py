"""Style markers (core.markers): each detector on texts whose answer is known, and the history rule."""

from __future__ import annotations

import pytest

from chameleon.core.markers import (
    HISTORY_THRESHOLDS,
    MARKERS,
    history_shares,
    history_shows,
    lower_start,
    readable,
    text_markers,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("great day at the beach", True),
        ("Great day at the beach", False),
        ("@bob great day", True),  # a leading mention is skipped
        ("@bob @amy Great day", False),
        ("@bob, you were right", None),  # a vocative: no first letter after the mention
        ("http://x.co/a so good", True),
        ("2 more days", None),
        ("", None),
        ("&quot;wow&quot; ok", None),  # HTML-unescaped: starts with a quote
    ],
)
def test_lower_start(text, expected):
    assert lower_start(text) is expected


@pytest.mark.parametrize(
    ("text", "marker", "carries"),
    [
        ("i think so", "lowercase_i", True),
        ("so i'm late", "lowercase_i", True),
        ("I think so, I'm late", "lowercase_i", False),
        ("a big igloo in italy", "lowercase_i", False),
        ("wait for it...", "punct_run", True),
        ("Great!!", "punct_run", True),
        ("really?!", "punct_run", True),
        ("Hello. Bye!", "punct_run", False),
        ("that was sooo good", "elongation", True),
        ("see www.example.com or #yesss", "elongation", False),  # links and hashtags are not words
        ("a good book", "elongation", False),
        ("nice one :)", "emoticon", True),
        ("xD that was fun", "emoticon", True),
        ("love it <3", "emoticon", True),
        ("party time 🎉", "emoticon", True),
        ("I expect to explain it", "emoticon", False),  # "xp" inside a word is no emoticon
        ("read http://a.b/c:D", "emoticon", False),
        ("he said &quot;) ok", "emoticon", False),
        ("go team #winning", "hashtag", True),
        ("we are #1", "hashtag", False),
        ("it&#39;s fine", "hashtag", False),
        ("@user hi", "hashtag", False),
    ],
)
def test_text_markers(text, marker, carries):
    assert text_markers(text)[marker] is carries


def test_every_marker_has_a_threshold_and_a_detector():
    assert set(HISTORY_THRESHOLDS) == set(MARKERS) == set(text_markers("x"))


def test_history_shares_and_the_70_percent_rule():
    lower7 = [f"tweet number {k} here" for k in range(7)] + [f"Tweet {k}" for k in range(3)]
    shares = history_shares(lower7)
    assert shares["lower_start"] == pytest.approx(0.7)
    assert history_shows(shares)["lower_start"]
    lower6 = lower7[1:] + ["Another one"]
    assert history_shares(lower6)["lower_start"] == pytest.approx(0.6)
    assert not history_shows(history_shares(lower6))["lower_start"]
    # Items without a first letter neither start lowercase nor uppercase.
    assert history_shares(["@a, hi", "ok then", "🎉"])["lower_start"] == 1.0
    assert history_shares(["#tag one", "no tag", "", "  "])["hashtag"] == 0.5
    assert history_shares([]) == {m: 0.0 for m in MARKERS}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so happy today :)", True),
        ("I love it 😊", True),
        ("🌟🌟🌟🌟🌟🌟🌟🌟", False),  # a marker and nothing else: degenerate
        ('@Hydrohs: "👍👍👍👍👍', False),
        ("#happy #happy #happy", False),
        ("see https://x.co/abc @bob", False),
        ("Hello there.", False),  # two words: too short to tell a style
    ],
)
def test_readable_needs_three_words_besides_the_markers(text, expected):
    assert readable(text) is expected
