"""The baselines' answers and prompts: ``copy`` (no model) and LaMP-7's retrieval prompt for ``rag``."""

from __future__ import annotations

from chameleon.evaluation.lamp import LampQuestion, extract_lamp7_tweet, profile_texts
from chameleon.evaluation.retrieval import bm25_top_k

__all__ = ["copy_answer", "rag_items", "rag_prompt"]


def copy_answer(lamp_input: str) -> str:
    """The ``copy`` method: the tweet inside the LaMP-7 input."""
    return extract_lamp7_tweet(lamp_input)


def rag_items(question: LampQuestion, k: int) -> list[int]:
    """Indices of the top-k profile items by BM25, the tweet of the input as the query (LaMP's rule)."""
    return bm25_top_k(extract_lamp7_tweet(question.input), profile_texts(question), k)


def rag_prompt(question: LampQuestion, k: int, max_item_chars: int = 300) -> str:
    """LaMP-7's retrieval prompt: ``"t1" , and "t2"  are written by a person. Following the given
    patterns <input>`` with the top-k profile tweets by BM25 (k = 0 gives the plain input).

    The form follows LaMP's ``create_parphrase_tweet_prompt``; items are cut to ``max_item_chars``
    characters instead of LaMP's per-item token budget (tweets are short; the cut rarely acts).
    """
    if k <= 0:
        return question.input
    texts = profile_texts(question)
    items = []
    for i in rag_items(question, k):
        t = " ".join(texts[i].split())
        items.append(f'"{t[:max_item_chars]}" ')
    if not items:
        return question.input
    return f"{', and '.join(items)} are written by a person. Following the given patterns {question.input}"
