"""The visible marker of each example writing style, and whether an answer carries it.

The demo shows, per example user, whether the base and the personalized answer carry the marker
of the user's style (capitals for a shouting fan, emoji for an emoji lover, ...), and counts the
styles whose marker the personalized answer carries and the base answer does not. A reader sees
the style, or its absence, without trusting a similarity score.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_EMOJI = re.compile(r"[\U0001F000-\U0001FAFF\u2600-\u27BF]")
_CONTRACTION = re.compile(r"\b\w+'(?:s|t|re|ve|ll|d|m)\b", re.IGNORECASE)
_PIRATE = re.compile(
    r"\b(?:arr+|ahoy|matey|hearties|avast|ye|scallywags?|shiver|timbers|yo ho|me ship)\b", re.I
)
_SAD = re.compile(
    r"\.\.\.|…|\b(?:sad|alone|lonely|tears?|grey|gray|empty|fades?|forgotten|nothing stays|sorrow|melancholy|echo(?:es)?|rain|never|wish|let go)\b",
    re.IGNORECASE,
)
_HASHTAG = re.compile(r"(?<!\w)#\w+")
_RUN = re.compile(r"!{2,}")


def _capitals(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.5 * len(letters)


def _lowercase(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and not any(c.isupper() for c in letters)


MARKERS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "shouty_fan": ("half or more of the letters are capitals", _capitals),
    "emoji_lover": ("an emoji", lambda t: bool(_EMOJI.search(t))),
    "terse_engineer": ("at most 6 words", lambda t: 0 < len(t.split()) <= 6),
    "pirate_talker": ("a pirate word (arr, ahoy, matey, ye, ...)", lambda t: bool(_PIRATE.search(t))),
    "sad_poet": ("an ellipsis or a sad word", lambda t: bool(_SAD.search(t))),
    "formal_scholar": ("no contractions", lambda t: bool(t.strip()) and not _CONTRACTION.search(t)),
    "lowercase_texter": ("no capital letter", _lowercase),
    "hashtag_fan": ("a hashtag", lambda t: bool(_HASHTAG.search(t))),
    "exclaimer": ("a run of exclamation marks (!!)", lambda t: bool(_RUN.search(t))),
}
"""Style -> (what its marker is, in words; does a text carry it)."""


def has_marker(style: str, text: str) -> bool:
    return MARKERS[style][1](text)


DEMO_CAPACITY: dict = {
    "how": (
        "share of answers with the marker, without -> with an explicit instruction asking for it, on "
        "LaMP-7 tuning users (emoticons, hashtags, lowercase starts: users 0..47, the instruction after "
        "the user's message, docs/results/lamp7-style-capacity; the others: users 0..39, the "
        "instruction in the system turn)"
    ),
    "styles": {
        "capitals (an ALL-CAPS word)": {"base": 0.10, "best": 0.10},
        "emoticons or emoji": {"base": 0.00, "best": 0.604},
        "≤ 8 words": {"base": 0.10, "best": 0.20},
        "hashtags": {"base": 0.021, "best": 0.688},
        "starts lowercase": {"base": 0.083, "best": 0.062},
        "an exclamation mark": {"base": 0.07, "best": 0.07},
    },
    "vector": (
        "a content-matched style vector (raw − normalized tweets) left lowercase starts at 3.3 % at "
        "every readable strength (their users' golds: 78 %)"
    ),
}
"""The embedded model's measured capacity for the markers the example styles need. Asked outright
it carries emoticons/emoji and hashtags (when the instruction follows the user's message) and
nothing else measurable: capitals, length, lowercase and exclamation marks stay where they were
(`docs/results/lamp7-style-capacity`, and the system-turn probe in the team's LaMP-7 baselines). So
an edit can at most be expected to carry emoji_lover's marker and a hashtag-heavy user's;
`jobs/bench/demo_capacity.py` measures the residual edit itself on the example styles."""
