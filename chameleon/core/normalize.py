"""A neutral rendering of informal writing: the same content without the writer's style.

The style pair source (`synth.pair_source: style`) contrasts a user's raw text with this
rendering of the same text, so the pair differs in style only, never in content. The rules are
general and deterministic (no model, no per-user choice), applied in this order:

1. HTML entities decoded (`&amp;` → `&`), URLs and @mentions dropped, `#tags` kept as words.
2. Emoticons and emoji dropped; laughter and filler tokens (`lol`, `haha`, `lmao`, `xoxo`) dropped.
3. Elongations shortened: a letter repeated 3+ times becomes two when English often doubles it
   (`sooo` → `soo` → `so` through the spelling table, `coool` → `cool`), else one (`yaaay` → `yay`).
4. Punctuation runs collapsed (`!!!` → `!`, `...` / `…` → `.`, `?!?` → `?`).
5. Common informal spellings written out (`u` → `you`, `im` → `I'm`, `dont` → `don't`,
   `gonna` → `going to`, `pls` → `please`, ...: `INFORMAL`).
6. Casing: shouted words (all capitals, 4+ letters) lowercased, `i` → `I`, the first letter of
   every sentence capitalized; a final period added when the text ends without `.`, `!` or `?`.

What remains is the content in plain, standard writing. It is not a translation: slang without
an entry stays, and so do a writer's word choices; the rendering removes the surface markers
that the LaMP-7 inputs (LLM-neutralized tweets) also lack.
"""

from __future__ import annotations

import html
import re

INFORMAL: dict[str, str] = {
    "u": "you",
    "ur": "your",
    "r": "are",
    "ya": "you",
    "yo": "you",
    "im": "I'm",
    "ive": "I've",
    "id": "I'd",
    "dont": "don't",
    "cant": "can't",
    "wont": "won't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "wasnt": "wasn't",
    "arent": "aren't",
    "havent": "haven't",
    "couldnt": "couldn't",
    "shouldnt": "shouldn't",
    "wouldnt": "wouldn't",
    "thats": "that's",
    "whats": "what's",
    "theres": "there's",
    "youre": "you're",
    "gonna": "going to",
    "wanna": "want to",
    "gotta": "got to",
    "pls": "please",
    "plz": "please",
    "thx": "thanks",
    "thnx": "thanks",
    "tho": "though",
    "cuz": "because",
    "coz": "because",
    "b4": "before",
    "2day": "today",
    "2nite": "tonight",
    "2morrow": "tomorrow",
    "tmrw": "tomorrow",
    "tmr": "tomorrow",
    "nite": "night",
    "ppl": "people",
    "luv": "love",
    "bday": "birthday",
    "idk": "I don't know",
    "btw": "by the way",
    "omg": "oh my god",
    "soo": "so",
    "noo": "no",
    "yess": "yes",
    "yaa": "yes",
    "yea": "yes",
    "yeah": "yes",
    "ok": "okay",
    "k": "okay",
    "kk": "okay",
    "abit": "a bit",
    "alot": "a lot",
    "w/": "with",
}
"""Informal spelling → standard spelling, matched on whole words, case-insensitively."""

FILLERS = frozenset(
    {"lol", "lool", "lmao", "lmfao", "rofl", "haha", "hahaha", "hehe", "xoxo", "xox", "xx", "xxx"}
)
"""Laughter and sign-off tokens: style, not content."""

_URL = re.compile(r"https?://\S+|www\.\S+")
_MENTION = re.compile(r"(?<![\w@])@\w+:?")
_HASHTAG = re.compile(r"(?<![\w#])#(\w+)")
_EMOTICON = re.compile(
    r"(?:(?<!\w)[:;=8xX][-o^']?[)(DPpO/\\|\]\[*3]+(?!\w)|<3+|\^_?\^|-_-|[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200D])"
)
_ELONGATION = re.compile(r"([A-Za-z])\1{2,}")
_DOUBLES_OK = set("eolstfprmncdgbzEOLSTFPRMNCDGBZ")
_DOTS = re.compile(r"(?:\.{2,}|…)+")
_RUN = re.compile(r"([!?])[!?]+")
_WORD = re.compile(r"[A-Za-z0-9/']+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")
_REPEATED_PUNCT = re.compile(r"([.,!?;:])(?:\s*[.,;:])+")
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")


def _shorten(match: re.Match[str]) -> str:
    letter = match.group(1)
    return letter * 2 if letter in _DOUBLES_OK else letter


def _word(match: re.Match[str]) -> str:
    word = match.group(0)
    low = word.lower()
    if low in FILLERS or (low.startswith("haha") and set(low) <= set("ha")):
        return ""
    if low in INFORMAL:
        return INFORMAL[low]
    if low == "i":
        return "I"
    if len(word) >= 4 and word.isupper() and word.isalpha():
        return low  # a shouted word
    return word


def neutralize(text: str) -> str:
    """The neutral rendering of `text` (module docstring); empty when nothing but style remains."""
    t = html.unescape(text)
    t = _URL.sub(" ", t)
    t = _MENTION.sub(" ", t)
    t = _HASHTAG.sub(r"\1", t)
    t = _EMOTICON.sub(" ", t)
    t = _ELONGATION.sub(_shorten, t)
    t = _DOTS.sub(".", t)
    t = _RUN.sub(r"\1", t)
    t = _WORD.sub(_word, t)
    t = " ".join(t.split())
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    t = _REPEATED_PUNCT.sub(r"\1", t)
    t = t.strip(" .,;:-")
    if not t:
        return ""
    t = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), t)
    if t[-1] not in ".!?":
        t += "."
    return t
