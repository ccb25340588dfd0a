"""Tests for chameleon.evaluation.retrieval (BM25 with bm25s) on tiny hand-written profiles."""

from __future__ import annotations

import numpy as np

from chameleon.evaluation.retrieval import bm25_scores, bm25_top_k

PROFILE = [
    "going to the beach with my dog today",  # 0
    "my new laptop keeps crashing, so annoying",  # 1
    "",  # 2: empty item
    "the dog ate my homework again lol",  # 3
    "watching football with friends tonight",  # 4
    "laptop battery died in the middle of class",  # 5
]


def test_bm25_returns_the_matching_items_in_rank_order():
    top = bm25_top_k("my laptop keeps dying, the battery is dead", PROFILE, k=2)
    assert sorted(top) == [1, 5]
    top = bm25_top_k("dog", PROFILE, k=2)
    assert sorted(top) == [0, 3]
    # "football friends" matches only item 4, which must come first
    assert bm25_top_k("football with friends", PROFILE, k=3)[0] == 4


def test_bm25_rarer_term_ranks_higher():
    docs = ["dog dog cat", "dog fish", "cat bird", "dog bird"]
    # "fish" occurs once in the collection, "dog" in 3 docs: doc 1 (dog + fish) must be first
    assert bm25_top_k("dog fish", docs, k=1) == [1]


def test_bm25_k_larger_than_n_and_zero_score_order():
    top = bm25_top_k("dog", PROFILE, k=100)
    assert len(top) == len(PROFILE) and sorted(top) == list(range(len(PROFILE)))
    # matching items first, then the rest in their original order
    assert sorted(top[:2]) == [0, 3]
    assert top[2:] == [1, 2, 4, 5]


def test_bm25_no_overlap_falls_back_to_first_k():
    assert bm25_top_k("zebra quantum", PROFILE, k=3) == [0, 1, 2]
    assert bm25_top_k("", PROFILE, k=2) == [0, 1]  # query without tokens
    assert bm25_top_k("the a", PROFILE, k=2) == [0, 1]  # stopwords / 1-letter words only


def test_bm25_degenerate_inputs():
    assert bm25_top_k("dog", [], k=3) == []
    assert bm25_top_k("dog", PROFILE, k=0) == []
    assert bm25_top_k("dog", ["", "", ""], k=2) == [0, 1]
    assert bm25_top_k("dog", ["only one dog"], k=5) == [0]
    scores = bm25_scores("dog", PROFILE)
    assert scores.shape == (len(PROFILE),)
    assert scores[2] == 0 and scores[0] > 0 and scores[3] > 0
    assert np.all(scores[[1, 4, 5]] == 0)
