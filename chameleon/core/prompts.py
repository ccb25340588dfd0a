"""Every prompt the method uses, in one versioned place.

Change any text here and bump `PROMPT_VERSION`: it is written into every artifact, so edits made
with different prompts are never mistaken for one another.

The answer templates follow a third-party reimplementation's reading of the paper's appendix
A.3 (the paper's own prompts were not available to us): "You are a helpfully personalized assistant. The user
prefers: …" versus "You are a generic and impersonal assistant. Follow these neutral
characteristics: …". The insight prompts follow the lab's AlignEZ pattern of asking the model to
list the characteristics of a desirable and of an undesirable answer.
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_VERSION = "v1"

PARAPHRASE_TWEET = "Paraphrase the following tweet without any explanation before or after it: "
"""The LaMP-7 task instruction (its inputs are this string followed by a tweet)."""

HISTORY_ITEM_CHARS = 300
"""Each history item is cut to this many characters inside insight prompts."""

INSIGHT_PERSONALIZED = (
    "Here are some texts written by one person:\n{history}\n\n"
    "In 3 short bullet points, describe how this person writes: tone, word choice, "
    "punctuation and capitalization, length, typical topics. Write only the bullet points."
)

INSIGHT_NEUTRAL = (
    "Here are some texts written by one person:\n{history}\n\n"
    "In 3 short bullet points, describe a generic, impersonal way of writing that ignores this "
    "person's habits: standard grammar, neutral tone, no slang or emoticons. Write only the bullet points."
)

ANSWER_PERSONALIZED = "You are a helpfully personalized assistant. The user prefers: {insight}\n\n{query}"

ANSWER_NEUTRAL = (
    "You are a generic and impersonal assistant. Follow these neutral characteristics: {insight}\n\n{query}"
)


def format_history(items: Sequence[str]) -> str:
    lines = []
    for i, text in enumerate(items, 1):
        text = " ".join(text.split())
        if len(text) > HISTORY_ITEM_CHARS:
            text = text[:HISTORY_ITEM_CHARS] + "…"
        lines.append(f"{i}. {text}")
    return "\n".join(lines)


def insight_prompts(items: Sequence[str]) -> tuple[str, str]:
    """(personalized, neutral) insight requests for one user's selected history."""
    history = format_history(items)
    return INSIGHT_PERSONALIZED.format(history=history), INSIGHT_NEUTRAL.format(history=history)


def answer_prompts(query: str, insight_p: str, insight_n: str) -> tuple[str, str]:
    """(personalized, neutral) answer requests for one query."""
    return (
        ANSWER_PERSONALIZED.format(insight=insight_p.strip(), query=query),
        ANSWER_NEUTRAL.format(insight=insight_n.strip(), query=query),
    )
