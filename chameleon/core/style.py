"""Style of short texts: stylometric features, and how much an answer is written like its user.

The job groups users by the features of their history (`groups.features: style`); the evaluation
and the demo measure style directly, against a user's own history items that the run did not use
(neither for pairs nor for calibration), since ROUGE against one gold tweet rewards closeness to
the input as much as a user's style:

- `style_similarity`: author verification by character n-grams, the classic stylometric signal.
  The answer and the user's reference items become TF vectors of character 2- to 4-grams
  (lowercase kept: casing is style); the score is their cosine, in [0, 1]. It is compared per user
  between methods (paired), so vocabulary shared by all users cancels out.
- `style_features`: cheap stylometric features (lowercase share, length, punctuation runs,
  emoticons, @mentions, URLs, hashtags, elongations, all-caps words); `feature_distance` is the
  mean absolute z-score of an answer's features against the user's reference items (lower =
  closer to the user).
- Diagnostics: `assistant_talk` (the answer talks like a chatbot: apologies, "Here is…", "as an
  AI"), closeness to the input (ROUGE-L of answer vs input, in the scoring module) and the length
  ratio.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from chameleon.core.markers import ELONGATION, EMOTICON, HASHTAG, MENTION, PUNCT_RUN, URL

NGRAM_RANGE = (2, 4)

_WORD = re.compile(r"[A-Za-z']+")
_ASSISTANT = re.compile(
    r"(?:\bI'?m sorry\b|\bas an AI\b|\bAI (?:language )?model\b|\bhere(?:'s| is| are)\b[^.:]*[:]|"
    r"\bparaphras|\brephras|\bthe (?:original )?tweet\b|\bI can(?:not|'t) (?:help|assist)\b|"
    r"\bI'm here to (?:help|assist)\b|\bcertainly\b|\bsure[,!]|\bassistant\b)",
    re.IGNORECASE,
)

FEATURES = (
    "lowercase_share",
    "log_words",
    "punct_runs",
    "emoticons",
    "mentions",
    "urls",
    "hashtags",
    "elongations",
    "caps_words",
    "starts_lowercase",
)


def char_ngrams(text: str, lo: int = NGRAM_RANGE[0], hi: int = NGRAM_RANGE[1]) -> Counter[str]:
    text = " ".join(text.split())
    return Counter(text[i : i + n] for n in range(lo, hi + 1) for i in range(max(0, len(text) - n + 1)))


def _cosine(a: Counter[str], b: Counter[str]) -> float:
    if not a or not b:
        return 0.0
    dot = sum(v * b.get(k, 0) for k, v in a.items())
    return dot / (math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values())))


def style_similarity(answer: str, reference: Sequence[str]) -> float:
    """Cosine of character 2-4-gram counts of `answer` and of the user's reference items pooled."""
    pooled: Counter[str] = Counter()
    for text in reference:
        pooled.update(char_ngrams(text))
    return _cosine(char_ngrams(answer), pooled)


def style_features(text: str) -> np.ndarray:
    """The stylometric features of one text, in the order of `FEATURES`."""
    letters = [c for c in text if c.isalpha()]
    words = _WORD.findall(text)
    n_words = max(1, len(words))
    return np.array(
        [
            sum(c.islower() for c in letters) / max(1, len(letters)),
            math.log1p(len(text.split())),
            len(PUNCT_RUN.findall(text)) / n_words,
            len(EMOTICON.findall(text)) / n_words,
            len(MENTION.findall(text)) / n_words,
            len(URL.findall(text)) / n_words,
            len(HASHTAG.findall(text)) / n_words,
            len(ELONGATION.findall(text)) / n_words,
            sum(len(w) > 1 and w.isupper() for w in words) / n_words,
            float(bool(text.strip()) and text.strip()[0].islower()),
        ]
    )


def history_style(texts: Sequence[str]) -> np.ndarray:
    """The mean features of a user's texts (what style grouping clusters on)."""
    return np.stack([style_features(t) for t in texts]).mean(0) if texts else np.zeros(len(FEATURES))


def feature_distance(answer: str, reference: Sequence[str]) -> float:
    """Mean |z| of the answer's features against the reference items' (std floored at 0.05)."""
    ref = np.stack([style_features(t) for t in reference]) if reference else np.zeros((1, len(FEATURES)))
    mu, sd = ref.mean(0), np.maximum(ref.std(0), 0.05)
    return float(np.abs((style_features(answer) - mu) / sd).mean())


def assistant_talk(answer: str) -> bool:
    """The answer talks like a chatbot (apologies, lead-ins, talk about the tweet) instead of being one."""
    return bool(_ASSISTANT.search(answer))
