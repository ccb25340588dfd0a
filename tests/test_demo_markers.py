"""The demo's style markers (dev.demo_markers): each example style's own texts carry its marker, a plain
neutral sentence carries none of the markers that mark a departure from plain writing."""

from __future__ import annotations

import pytest

from chameleon.dev.demo import EXAMPLE_STYLES, NEUTRAL_TWEETS, OTHER_STYLES
from chameleon.dev.demo_markers import MARKERS, has_marker

STYLES = {**EXAMPLE_STYLES, **OTHER_STYLES}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_style_has_a_marker_its_own_texts_carry(style):
    assert style in MARKERS
    assert sum(has_marker(style, t) for t in STYLES[style]) >= len(STYLES[style]) - 1


@pytest.mark.parametrize("style", ["shouty_fan", "emoji_lover", "pirate_talker", "sad_poet", "lowercase_texter",
                                   "hashtag_fan", "exclaimer"])  # fmt: skip
def test_plain_sentences_do_not_carry_departure_markers(style):
    assert not any(has_marker(style, t) for t in NEUTRAL_TWEETS)


def test_marker_edges():
    assert has_marker("shouty_fan", "WE WON TONIGHT!!") and not has_marker("shouty_fan", "We won tonight")
    assert has_marker("formal_scholar", "I am home now.") and not has_marker(
        "formal_scholar", "I'm home now."
    )
    assert not has_marker("formal_scholar", "   ")
    assert has_marker("terse_engineer", "deploy done.") and not has_marker("terse_engineer", "")
    assert has_marker("lowercase_texter", "home now lol") and not has_marker("lowercase_texter", "Home now")
    assert has_marker("sad_poet", "the house is empty...")


def test_the_capacity_note_covers_every_shown_style_and_names_the_replaced_ones():
    from chameleon.dev.demo import capacity_note
    from chameleon.dev.demo_markers import DEMO_CAPACITY

    assert len(EXAMPLE_STYLES) == 6 and set(EXAMPLE_STYLES) <= set(DEMO_CAPACITY["styles"])
    note = capacity_note().splitlines()
    for style in DEMO_CAPACITY["styles"]:
        (line,) = [x for x in note if x.split()[0] == style]
        assert ("replaced" in line) == (style not in EXAMPLE_STYLES), line
