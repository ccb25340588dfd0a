"""Tests for chameleon.evaluation.metrics: expected values computed by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from chameleon.core.generation import first_answer_line
from chameleon.evaluation.metrics import (
    bootstrap_ci,
    paired_bootstrap,
    paired_sign_test,
    rouge_per_item,
)

# ----------------------------------------------------------------------------- ROUGE


def test_rouge_hand_computed():
    # "the cat sat" vs "the cat ran": 2 shared unigrams of 3 each -> P = R = F = 2/3; LCS = 2 -> 2/3
    r = rouge_per_item(["the cat sat"], ["the cat ran"])
    assert r["rouge1"] == [pytest.approx(2 / 3)]
    assert r["rougeL"] == [pytest.approx(2 / 3)]


def test_rouge1_and_rougeL_differ_on_word_order():
    # "cat the sat" vs "the cat sat": all unigrams shared -> rouge1 F = 1; LCS = 2 ("the sat") -> 2/3
    per = rouge_per_item(["cat the sat"], ["the cat sat"])
    assert per["rouge1"] == [pytest.approx(1.0)]
    assert per["rougeL"] == [pytest.approx(2 / 3)]


def test_rouge_per_item_order():
    preds = ["the cat sat", "the cat sat on the mat", "", "The CAT!"]
    golds = ["the cat ran", "the cat sat", "anything", "the cat"]
    # item 2: pred 6 tokens, gold 3, clipped overlap 3 -> P=1/2, R=1 -> F=2/3 (rougeL: LCS 3, same)
    # item 3: empty prediction -> 0; item 4: default tokenizer lowercases, drops punctuation -> 1
    per = rouge_per_item(preds, golds)
    assert per["rouge1"] == pytest.approx([2 / 3, 2 / 3, 0.0, 1.0])
    assert per["rougeL"] == pytest.approx([2 / 3, 2 / 3, 0.0, 1.0])


def test_rouge_no_stemming():
    # with a stemmer "cats"/"cat" would match; LaMP's setting has none -> 0
    assert rouge_per_item(["cats"], ["cat"])["rouge1"] == [0.0]


def test_rouge_rejects_length_mismatch():
    with pytest.raises(ValueError):
        rouge_per_item(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no items"):
        rouge_per_item([], [])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(1).normal(0.4, 0.2, size=50)
    ci = bootstrap_ci(values, seed=7)
    assert ci.low <= ci.mean <= ci.high
    assert ci.mean == pytest.approx(values.mean())
    assert bootstrap_ci(values, seed=7) == ci
    assert bootstrap_ci(values, seed=8) != ci


def test_bootstrap_ci_narrows_with_more_data():
    rng = np.random.default_rng(2)
    small = bootstrap_ci(rng.uniform(size=20))
    large = bootstrap_ci(rng.uniform(size=2000))
    # width shrinks like 1/sqrt(n): sqrt(100) = 10x narrower in expectation
    assert (large.high - large.low) < (small.high - small.low) / 4


def test_bootstrap_ci_constant_and_level():
    ci = bootstrap_ci([0.5] * 10)
    assert ci == (0.5, 0.5, 0.5)
    values = np.random.default_rng(3).uniform(size=100)
    wide, narrow = bootstrap_ci(values, ci=0.99), bootstrap_ci(values, ci=0.5)
    assert wide.low < narrow.low and narrow.high < wide.high


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], ci=1.5)


def test_paired_bootstrap_detects_clear_shift():
    rng = np.random.default_rng(4)
    b = rng.uniform(0.2, 0.6, size=100)
    a = b + 0.05 + rng.normal(0, 0.02, size=100)
    r = paired_bootstrap(a, b)
    assert r.mean_diff == pytest.approx(float(np.mean(a - b)))
    assert 0 < r.low <= r.mean_diff <= r.high
    assert r.p_value < 0.01
    # the reverse comparison is the mirror image
    rev = paired_bootstrap(b, a)
    assert rev.mean_diff == pytest.approx(-r.mean_diff)
    assert rev.high < 0 and rev.p_value < 0.01


def test_paired_bootstrap_null():
    rng = np.random.default_rng(5)
    a = rng.uniform(size=200)
    b = rng.uniform(size=200)  # same distribution, independent
    r = paired_bootstrap(a, b, seed=0)
    assert r.low < 0 < r.high
    assert r.p_value > 0.05
    # exactly symmetric differences: observed mean 0 -> p = 1
    x = np.array([0.1, 0.3, 0.2, 0.7])
    sym = paired_bootstrap(np.r_[x, -x], np.zeros(8))
    assert sym.mean_diff == pytest.approx(0.0)
    assert sym.p_value == 1.0


def test_paired_bootstrap_rejects_unpaired():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_paired_sign_test():
    # 10 wins, 0 losses, 1 tie: p = 2 * (1/2)^10 = 1/512
    a = [1.0] * 10 + [0.5]
    b = [0.0] * 10 + [0.5]
    r = paired_sign_test(a, b)
    assert (r["n_pos"], r["n_neg"], r["n_ties"]) == (10, 0, 1)
    assert r["p_value"] == pytest.approx(1 / 512)
    # 3 wins, 3 losses: p = min(1, 2 * P[Bin(6, 1/2) <= 3]) = 1
    assert paired_sign_test([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])["p_value"] == 1.0


# ----------------------------------------------------------------------------- post-processing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("just this", "just this"),
        ("\n\n  first line  \nsecond line", "first line"),
        ('Here\'s a rewritten version of the tweet:\n\n"so bored today"\nmore', "so bored today"),
        ('Paraphrased tweet: "omg so tired"', "omg so tired"),  # lead-in and quotes on one line
        ("Sure! Here it is: gonna sleep", "gonna sleep"),
        ("“curly quotes”", "curly quotes"),
        ('he said "hi" to me', 'he said "hi" to me'),  # inner quotes stay
        (
            "Note: this line has a colon inside but does not end with one\nnext",
            "Note: this line has a colon inside but does not end with one",
        ),
        ("Only a preamble:", "Only a preamble:"),  # nothing follows: keep it
        ("Here is the tweet:", ""),  # a lead-in alone is no answer
        ("", ""),
        ("   \n \n", ""),
    ],
)
def test_first_answer_line(text, expected):
    assert first_answer_line(text) == expected
