"""Style attribution: is an answer written more like its own user than like other users?

For each user, the user's own unused history and that of ``n_candidates - 1`` other users (a
seeded draw among the scored users, the same draw for every method so methods compare paired) are
ranked by the project's style similarity (``core.style``: cosine of character 2-4-gram counts of
the answer and of a candidate's pooled items), with @mentions and URLs removed from both sides
first (``core.markers.without_handles``): an answer copies the mention of its LaMP input, and the
user's history mentions the same people, so a mention would attribute copying, not style. The rank of the own user is the user's
``attribution_rank`` (1 = the own user ranks first); the mean reciprocal rank (MRR) and the top-1
share summarize a method. Chance: top-1 = 1/n_candidates (5 % with 20), MRR = H_n / n (0.180).

Ties (e.g. an empty answer scores 0 against everybody) are broken by a seeded draw, so a
degenerate answer scores chance, not first place.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from chameleon.core.markers import without_handles
from chameleon.core.style import char_ngrams

__all__ = ["N_CANDIDATES", "attribution_ranks", "candidate_sets", "chance_mrr", "mrr", "profiles_of", "top1"]

N_CANDIDATES = 20
"""The own user plus 19 others."""


def _seed(seed: int, what: str) -> int:
    return int(hashlib.sha256(f"{seed}:{what}".encode()).hexdigest()[:16], 16)


def candidate_sets(
    user_ids: Sequence[str], n_candidates: int = N_CANDIDATES, seed: int = 0
) -> list[list[int]]:
    """Per user (by index), the indices of its candidates: itself first, then ``n_candidates - 1``
    other users drawn without replacement (all others when there are fewer). The draw depends on
    the seed and the users' ids only (not on their order), so it is the same for every method."""
    n = len(user_ids)
    if len(set(user_ids)) != n:
        raise ValueError("user ids must be distinct")
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2, got {n_candidates}")
    by_id = sorted(range(n), key=lambda j: str(user_ids[j]))  # the draw ignores the users' order
    out = []
    for i, uid in enumerate(user_ids):
        others = [j for j in by_id if j != i]
        rng = np.random.default_rng(_seed(seed, f"candidates:{uid}"))
        k = min(n_candidates - 1, len(others))
        out.append([i, *(others[j] for j in rng.choice(len(others), size=k, replace=False))])
    return out


class _Profile:
    """A user's pooled reference n-grams and their norm (computed once, used by every method)."""

    __slots__ = ("grams", "norm")

    def __init__(self, reference: Sequence[str]) -> None:
        self.grams: Counter[str] = Counter()
        for text in reference:
            self.grams.update(char_ngrams(without_handles(text)))
        self.norm = math.sqrt(sum(v * v for v in self.grams.values()))

    def similarity(self, grams: Counter[str], norm: float) -> float:
        """The same cosine as :func:`core.style.style_similarity` (0 for an empty side)."""
        if not norm or not self.norm:
            return 0.0
        return sum(v * self.grams.get(k, 0) for k, v in grams.items()) / (norm * self.norm)


def attribution_ranks(
    answers: Sequence[str],
    references: Sequence[Sequence[str]],
    candidates: Sequence[Sequence[int]],
    user_ids: Sequence[str],
    *,
    seed: int = 0,
    profiles: Sequence[_Profile] | None = None,
) -> list[int]:
    """Per user, the rank (1 = first) of the own user's references among its candidates by the
    style similarity of ``answers[i]``; ``candidates[i][0]`` must be ``i``. Ties are broken by a
    draw seeded by the seed and the user's id, identical for every method."""
    n = len(answers)
    if len(references) != n or len(candidates) != n or len(user_ids) != n:
        raise ValueError(
            f"{n} answers, {len(references)} references, {len(candidates)} candidate sets, {len(user_ids)} ids"
        )
    profiles = profiles if profiles is not None else [_Profile(r) for r in references]
    ranks = []
    for i, (answer, cands) in enumerate(zip(answers, candidates, strict=True)):
        if not cands or cands[0] != i:
            raise ValueError(f"candidate set {i} must start with the user itself")
        grams = char_ngrams(without_handles(answer))
        norm = math.sqrt(sum(v * v for v in grams.values()))
        sims = np.array([profiles[j].similarity(grams, norm) for j in cands])
        own = sims[0]
        greater = int(np.sum(sims[1:] > own + 1e-12))
        tied = int(np.sum(np.abs(sims[1:] - own) <= 1e-12))
        rng = np.random.default_rng(_seed(seed, f"tie:{user_ids[i]}"))
        ranks.append(1 + greater + (int(rng.integers(0, tied + 1)) if tied else 0))
    return ranks


def profiles_of(references: Sequence[Sequence[str]]) -> list[_Profile]:
    """The pooled n-gram profiles of every user's references (to reuse over methods)."""
    return [_Profile(r) for r in references]


def mrr(ranks: Sequence[float]) -> float:
    """Mean reciprocal rank."""
    return float(np.mean(1.0 / np.asarray(ranks, dtype=float)))


def top1(ranks: Sequence[float]) -> float:
    """Share of users whose own references rank first."""
    return float(np.mean(np.asarray(ranks) == 1))


def chance_mrr(n_candidates: int) -> float:
    """MRR of a random ranking among ``n_candidates`` (H_n / n)."""
    return sum(1.0 / k for k in range(1, n_candidates + 1)) / n_candidates
