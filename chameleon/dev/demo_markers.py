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
    "asked": (
        "share of readable answers (the marker and 3 words besides) with the marker without -> with "
        "an instruction asking for it, LaMP-7 tuning users (docs/results/lamp7-style-capacity; "
        "capitals and length: the system-turn probe)"
    ),
    "edit": (
        "share of the demo's 6 paraphrases with the marker, base -> the best edit whose answers stay "
        "close to the input (ROUGE-L >= 0.3), at layer:strength (jobs/bench/demo_capacity.py, "
        "docs/results/demo-capacity)"
    ),
    "styles": {
        "shouty_fan": {"asked": (0.10, 0.10), "edit": (0.0, 0.83, "12:0.8")},
        "formal_scholar": {"asked": None, "edit": (0.67, 0.83, "9:0.2")},
        "emoji_lover": {"asked": (0.0, 0.0), "edit": (0.0, 0.0, None)},
        "terse_engineer": {"asked": (0.10, 0.20), "edit": (0.0, 0.50, "15:0.8")},
        "lowercase_texter": {"asked": (0.083, 0.062), "edit": (0.0, 1.0, "15:0.8")},
        "hashtag_fan": {"asked": (0.021, 0.521), "edit": (0.0, 0.0, None)},
        "pirate_talker": {"asked": None, "edit": (0.0, 0.0, None)},
        "sad_poet": {"asked": None, "edit": (0.0, 0.0, None)},
    },
}
"""The embedded model's measured capacity for each example style (and the pirate and the sad
poet, which lowercase_texter and hashtag_fan replaced), two ways. Asked outright it
writes hashtags in readable answers and nothing else measurable: the emoji it writes when asked
(60 % of answers) are runs of emoji with no words, none readable. Under a style edit it carries none of the
styles at the strengths the job calibrates (≤ 0.3 of the state norm); at 0.8 it writes lowercase
(readable: "i going to the beach this weekend with my friends"), half its answers in ≤ 6 words, and
capitals only inside garbled words ("THE BEDLACEYES"); emoji and hashtags never appear. So the demo
can show at most the styles a calibrated edit reaches, and prints these figures under its lines."""
