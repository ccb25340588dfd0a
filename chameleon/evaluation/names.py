"""Names and defaults of the evaluation, light enough for the command-line parser (no torch, no numpy).

Methods (names as written to ``results.json``, in report order):

- ``copy``: the tweet inside the LaMP input, no model (the sanity line every report carries).
- ``base``: the instruction-tuned model alone, the LaMP input as the one user message.
- ``rag``: LaMP's retrieval baseline: the top-k profile tweets by BM25 in LaMP-7's own prompt form,
  then the LaMP input.
- ``chameleon_user``: each user's own edit (users without one fall back to the base model).
- ``chameleon_group``: the user's group edit; groups from the tuning users plus the reported users.
- ``chameleon_unseen``: groups from the tuning users only; each reported user is assigned to the
  nearest group from the embedding of its history alone.
- ``chameleon_global``: one group for everybody (k = 1), beside the chosen k: shows whether groups
  add anything over a global style prior.
- ``random_direction`` (control): each group edit replaced by a random direction of the same
  norm at the same layers; ``shuffled`` (control): each user gets another group's edit.
- ``swapped_residual`` and ``random_residual`` (controls, runs with ``edit.composition:
  residual`` only): the global part plus another user's personal part, or a random one, of the
  same layer and norm (``evaluation.residuals``); with that composition ``chameleon_global`` is
  the run's own global part, ``chameleon_group`` global + group residual and ``chameleon_user``
  global + group residual + user residual.
- ``base_plain`` and ``chameleon_group_plain``: base and group edit without the system prompt, so
  the report's 2×2 (prompt × edit) separates a prompt effect from an edit effect.

Every method gets the same prompt (the LaMP input as the user turn after ``NO_PREAMBLE`` as the
system turn; ``*_plain`` without it) and the same clean-up (``core.generation.first_answer_line``).
"""

from __future__ import annotations

from typing import Any

from chameleon.core.prompts import PARAPHRASE_TWEET

METHODS = (
    "copy",
    "base",
    "rag",
    "chameleon_user",
    "chameleon_group",
    "chameleon_unseen",
    "chameleon_global",
    "random_direction",
    "shuffled",
    "base_plain",
    "chameleon_group_plain",
    "swapped_residual",
    "random_residual",
)
"""Every method of the main evaluation, in report order."""

MODEL_METHODS = METHODS[1:]
"""The methods that run the model."""

REFERENCES = ("base", "rag")
"""Methods every other method is compared with (paired, per user)."""

GOAL_REL_ROUGE_L = 0.15
"""The project's goal: Chameleon (group level) beats base by at least this relative ROUGE-L."""

ABLATIONS = (
    "alpha",
    "beta",
    "n_layers",
    "theta_p",
    "theta_n",
    "site",
    "positions",
    "group_size",
    "unseen",
    "history",
)
"""Ablations run on tuning users; ``history`` needs its own (small) synthesis."""

NO_PREAMBLE = "Reply with the rewritten tweet only: no quotes, no explanation."
"""The system turn every method's prompt gets (the synthesis captures states under it too)."""

LAMP7_QUERY_TEMPLATE = PARAPHRASE_TWEET + "{text}"
"""LaMP-7's task query around a tweet (its inputs are this around a neutralized tweet)."""

EVAL_SYNTH_DEFAULTS: dict[str, Any] = {
    "synth.system_prompt": NO_PREAMBLE,
    "synth.query_template": LAMP7_QUERY_TEMPLATE,
    "synth.pairs_per_user": 4,
    "synth.insight_max_new_tokens": 48,
    "synth.answer_max_new_tokens": 40,
    "job.users_per_partition": 25,
}
"""Synthesis settings of the evaluation when no config file is given (sized for a few CPU cores)."""
