"""Style markers a reader sees in a short text, and whether a user's history shows them.

ROUGE (rouge-score's tokenizer lowercases and drops punctuation) cannot see any of these, and the
LaMP-7 input erases them, so they are what tells a personalized answer from a neutral one:

============== ===================================================================================
marker         an answer carries it when ...
============== ===================================================================================
lower_start    it starts with a lowercase letter, once leading @mentions and links are skipped
lowercase_i    it writes the pronoun "I" as a lowercase word ("i", "i'm", "i'll")
punct_run      it has a run of ``!``/``?`` (two or more), two or more dots, or "…"
elongation     a letter repeats three or more times in a word ("sooo", "yesss")
emoticon       it has an emoticon (``:)``, ``;-P``, ``xD``, ``<3``, ``^_^``) or an emoji
hashtag        it has a hashtag (``#word``)
============== ===================================================================================

Texts are HTML-unescaped first (LaMP's tweets carry ``&quot;`` and ``&amp;``), and URLs and
@mentions are removed before the markers are looked for (``www``, ``://``, ``@zzz`` would
otherwise count as elongations and emoticons).

A user's history *shows* a marker when at least :data:`HISTORY_THRESHOLDS` of its items carry it
(starts lowercase: 70 % of the items that have a first word, as issue 18 defines it; the others:
see the table's comment). The evaluation (``evaluation.personalization``) measures how often each
method's answers carry a marker for users whose history shows it, and for users whose does not;
the demo and the style-capacity measurement use the same detector.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

MARKERS = ("lower_start", "lowercase_i", "punct_run", "elongation", "emoticon", "hashtag")
"""Every marker, in report order."""

HISTORY_THRESHOLDS: dict[str, float] = {
    "lower_start": 0.70,
    # The others are rarer per tweet than a lowercase start: a quarter of a user's items carrying
    # one already marks the user (on tuning users the share of users over it is 7-30 % per marker,
    # and their golds carry the marker 3-8x as often as the other users' golds do).
    "lowercase_i": 0.20,
    "punct_run": 0.20,
    "elongation": 0.20,
    "emoticon": 0.20,
    "hashtag": 0.20,
}
"""Least share of a user's history items carrying a marker for the history to show it."""

# The patterns of informal writing, shared with `core.style`'s features (one definition each).
URL = re.compile(r"https?://\S+|www\.\S+")
MENTION = re.compile(r"(?<!\w)@\w+")
_LEAD = re.compile(r"^(?:\s*(?:@\w+|https?://\S+|www\.\S+)(?=\s))+\s*")
_LOWER_I = re.compile(r"(?<![\w'’])i(?=$|[\s'’.,!?;:)\]])")
PUNCT_RUN = re.compile(r"[!?]{2,}|\.{2,}|…")
ELONGATION = re.compile(r"([^\W\d_])\1{2,}")
EMOTICON = re.compile(
    r"(?<![\w:/])(?:[:;=][-o^']?[)(DPpO/\\|\]\[3*]|[xX][-']?D|<3|\^_?\^)(?![\w/])"
    r"|[\U0001F300-\U0001FAFF\u2600-\u27BF]"
)
HASHTAG = re.compile(r"(?<![\w&])#[^\W\d_]\w*")


def without_handles(text: str) -> str:
    """The text HTML-unescaped, with its URLs and @mentions removed (who and what a tweet links to
    is not how it is written)."""
    return MENTION.sub(" ", URL.sub(" ", html.unescape(str(text))))


def lower_start(text: str) -> bool | None:
    """Whether the text, after its leading @mentions and links, starts with a lowercase letter;
    ``None`` when it starts with no letter there (a digit, an emoji, punctuation, as in the
    vocative "@bob, you ..."), so such a text neither starts lowercase nor uppercase."""
    rest = _LEAD.sub("", html.unescape(str(text)).strip(), count=1)
    if not rest or not rest[0].isalpha():
        return None
    return rest[0].islower()


def text_markers(text: str) -> dict[str, bool]:
    """Which markers a text carries (every name of :data:`MARKERS`)."""
    t = without_handles(text)
    return {
        "lower_start": bool(lower_start(text)),
        "lowercase_i": bool(_LOWER_I.search(t)),
        "punct_run": bool(PUNCT_RUN.search(t)),
        "elongation": bool(ELONGATION.search(HASHTAG.sub(" ", t))),
        "emoticon": bool(EMOTICON.search(t)),
        "hashtag": bool(HASHTAG.search(t)),
    }


READABLE_MIN_WORDS = 3
"""Words a text needs besides its markers to count as readable."""

_WORD = re.compile(r"[^\W\d_]+")


def readable(text: str) -> bool:
    """Whether a text has at least :data:`READABLE_MIN_WORDS` words once its hashtags,
    emoticons/emoji, @mentions and URLs are removed. A small model pushed toward a marker can
    answer with nothing else ("🌟🌟🌟🌟…", "#happy #happy …"): that carries the marker but is
    no one's style, so capacity and transfer also count the answers that carry it and stay readable."""
    rest = EMOTICON.sub(" ", HASHTAG.sub(" ", without_handles(text)))
    return len(_WORD.findall(rest)) >= READABLE_MIN_WORDS


def history_shares(texts: Sequence[str]) -> dict[str, float]:
    """Per marker, the share of a user's items that carry it (0 for no items).

    ``lower_start`` counts only items that have a first word (an item of only mentions, links or
    emoji neither starts lowercase nor uppercase)."""
    texts = [t for t in texts if t and str(t).strip()]
    out = {m: 0.0 for m in MARKERS}
    if not texts:
        return out
    flags = [text_markers(t) for t in texts]
    for m in MARKERS:
        if m != "lower_start":
            out[m] = sum(f[m] for f in flags) / len(texts)
    starts = [s for s in (lower_start(t) for t in texts) if s is not None]
    out["lower_start"] = sum(starts) / len(starts) if starts else 0.0
    return out


def history_shows(shares: dict[str, float]) -> dict[str, bool]:
    """Per marker, whether a history with these :func:`history_shares` shows it."""
    return {m: shares[m] >= HISTORY_THRESHOLDS[m] for m in MARKERS}
