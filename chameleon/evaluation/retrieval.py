"""BM25 retrieval over one user's profile, with the ``bm25s`` package (used by the RAG baseline)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import bm25s
import numpy as np

# bm25s sets its own logger to DEBUG when imported; put it back to the level its users expect.
logging.getLogger("bm25s").setLevel(logging.WARNING)

__all__ = ["bm25_scores", "bm25_top_k"]


def _tokenize(texts: list[str], stopwords: str | list[str] | None) -> list[list[str]]:
    return bm25s.tokenize(texts, lower=True, stopwords=stopwords, return_ids=False, show_progress=False)


def bm25_scores(query: str, documents: Sequence[str], stopwords: str | list[str] | None = "en") -> np.ndarray:
    """BM25 score (Lucene variant, k1=1.5, b=0.75, bm25s defaults) of each document for ``query``.

    Tokenization is bm25s's: lowercased, words of 2+ word characters, English stopwords removed
    (``stopwords=None`` keeps them). Documents without tokens, and every document when the query has
    no tokens, score 0.
    """
    docs = ["" if d is None else str(d) for d in documents]
    if not docs:
        return np.zeros(0, dtype=np.float32)
    doc_tokens = _tokenize(docs, stopwords)
    (query_tokens,) = _tokenize([str(query)], stopwords)
    if not query_tokens or not any(doc_tokens):
        return np.zeros(len(docs), dtype=np.float32)
    retriever = bm25s.BM25()
    retriever.index(doc_tokens, show_progress=False)
    scores = np.asarray(retriever.get_scores(query_tokens), dtype=np.float32)
    if scores.shape != (len(docs),):  # defensive: bm25s must score every indexed document
        raise RuntimeError(f"bm25s returned {scores.shape} scores for {len(docs)} documents")
    return scores


def bm25_top_k(
    query: str, documents: Sequence[str], k: int, stopwords: str | list[str] | None = "en"
) -> list[int]:
    """Indices of the ``k`` best documents for ``query`` by BM25, best first.

    - ``k`` larger than the number of documents returns all of them; ``k <= 0`` returns ``[]``.
    - Ties (including documents with score 0) keep document order, so documents that share no
      term with the query come after every matching one, in their original order.
    - Fallback: when the query shares no term with any document (or has no tokens, or every
      document is empty), the result is the first ``k`` documents in order.
    """
    if k <= 0 or not documents:
        return []
    scores = bm25_scores(query, documents, stopwords=stopwords)
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[: min(k, len(documents))]]
