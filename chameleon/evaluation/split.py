"""The split rule: which LaMP-7 users may inform tuning decisions and which are reported.

Users are addressed by their position in the LaMP file; the first :data:`~chameleon.evaluation.lamp.N_TUNING`
(500) are the only ones any tuning decision may look at (ablations, the configuration chosen from
them), the others are reported. :func:`select_users` refuses a reported slice that reaches into the
tuning part and the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from chameleon.evaluation.lamp import N_TUNING

__all__ = ["parse_range", "select_users"]

T = TypeVar("T")


def parse_range(text: str | Sequence[int]) -> tuple[int, int]:
    """``"500:600"`` (or ``(500, 600)``) → ``(500, 600)``: file positions, start included, stop excluded."""
    if isinstance(text, str):
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"a user range is START:STOP (file positions), got {text!r}")
        try:
            start, stop = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"a user range is START:STOP with integers, got {text!r}") from None
    else:
        start, stop = (int(x) for x in text)
    if not 0 <= start < stop:
        raise ValueError(f"user range {start}:{stop} is empty or negative")
    return start, stop


def select_users(
    questions: Sequence[T],
    tuning: str | Sequence[int] | None,
    reported: str | Sequence[int] | None,
    n_tuning: int = N_TUNING,
    *,
    validation: bool = False,
) -> tuple[list[T], list[T]]:
    """The tuning and reported questions, by file position, enforcing the split rule.

    Tuning positions must lie in ``[0, n_tuning)`` and reported positions in ``[n_tuning, len)``:
    a reported user is never used for a tuning decision, and a tuning user is never reported.
    With ``validation`` (a tuning-phase run that takes decisions), the "reported" users are held-out
    tuning users instead: inside ``[0, n_tuning)`` and disjoint from the tuning range.
    ``None`` selects no users for that part.
    """
    if n_tuning < 0:
        raise ValueError(f"n_tuning must be >= 0, got {n_tuning}")
    n = len(questions)
    out: list[list[T]] = []
    scored = (
        ("validation", reported, 0, min(n_tuning, n)) if validation else ("reported", reported, n_tuning, n)
    )
    for name, rng, lo, hi in (("tuning", tuning, 0, min(n_tuning, n)), scored):
        if rng is None:
            out.append([])
            continue
        start, stop = parse_range(rng)
        if start < lo or stop > hi:
            raise ValueError(
                f"{name} users {start}:{stop} break the split rule: {name} positions must lie in {lo}:{hi} "
                f"(the first {n_tuning} users in file order are for tuning, the rest for reporting)"
            )
        out.append(list(questions[start:stop]))
    if validation and tuning is not None and reported is not None:
        (a, b), (c, d) = parse_range(tuning), parse_range(reported)
        if a < d and c < b:
            raise ValueError(f"validation users {c}:{d} overlap the tuning users {a}:{b}")
    return out[0], out[1]
