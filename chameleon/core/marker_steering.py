"""Marker parts: the model's own "write it this way" change, added for the markers a user's
history shows.

A marker (``core.markers``: emoticons, hashtags, lowercase starts, ...) is how a person writes,
and ROUGE cannot see it. A small model learns little of it from contrast pairs (its style
directions carry no marker it writes, `docs/results/lamp7-style-capacity`), but it does follow an
explicit instruction for some markers. The residual-stream change such an instruction makes where
the answer starts is a direction the model itself uses to write the marker:

    direction[marker][l] = mean over queries of  h_l(query + instruction) − h_l(query)

at the prompt's last position, at each of several layers. A user's **marker part** is the sum of
``strength`` × that direction over the markers the user's history shows, at every one of those
layers; added to the user's served edit (one multi-layer row of the `EditBank`), it makes the
answers of users who write with a marker carry it, and leaves everybody else's row unchanged.

Strength 1 adds the whole change the instruction makes at every edited layer. Each layer's change
already holds what earlier layers passed on, so several layers compound: readable strengths lie
well below 1 (0.25 on SmolLM2-135M, measured on tuning users by `jobs/bench/style_capacity.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chameleon.core.capture import capture
from chameleon.core.edit import Edit
from chameleon.core.generation import chat_prompt

__all__ = [
    "MARKER_INSTRUCTIONS",
    "MarkerParts",
    "default_marker_layers",
    "instructed_prompts",
    "instruction_directions",
    "marker_edit",
    "marker_steer",
    "with_marker_part",
]

MARKER_INSTRUCTIONS: dict[str, str] = {
    "lower_start": "Write it in all lowercase letters, like a casual tweet: no capital letters at all.",
    "lowercase_i": 'Write the word "I" in lowercase, as "i" (i am, i\'m, i\'ll).',
    "punct_run": "End it with several exclamation marks (!!!) or an ellipsis (...).",
    "elongation": 'Stretch one word by repeating a letter, like "sooo" or "yesss".',
    "emoticon": "Add an emoticon like :) or an emoji.",
    "hashtag": "Add a hashtag, like #happy.",
}
"""The explicit instruction that asks for each marker of :data:`~chameleon.core.markers.MARKERS`."""


@dataclass
class MarkerParts:
    """What a run derived for its marker parts: each marker's direction at `layers`."""

    layers: list[int]
    directions: dict[str, torch.Tensor]
    """marker -> [len(layers), d]"""
    n_queries: int
    """Queries the directions are the mean over."""

    def steer(self, markers: Sequence[str], strength: float) -> torch.Tensor | None:
        """The marker part of a user whose history shows `markers` (None: no part)."""
        return marker_steer(self.directions, markers, strength)


def instructed_prompts(
    messages: Sequence[str], system: str | None, marker: str | None, placement: str
) -> tuple[list[str], str | None]:
    """The user messages and system turn with ``marker``'s instruction at ``placement``
    (``system``: appended to the system turn; ``user``: after the user's message; None: as they are)."""
    if marker is None:
        return list(messages), system
    instruction = MARKER_INSTRUCTIONS[marker]
    if placement == "system":
        return list(messages), f"{system} {instruction}" if system else instruction
    return [f"{m}\n\n{instruction}" for m in messages], system


def default_marker_layers(n_layers: int) -> list[int]:
    """Every third layer from layer 3 (3, 6, …, 27 on a 30-layer model: the layers measured on
    SmolLM2-135M); empty for models under 4 layers."""
    return list(range(3, n_layers, 3))


def instruction_directions(
    model,
    tok,
    messages: Sequence[str],
    markers: Sequence[str],
    layers: Sequence[int],
    *,
    system: str | None,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Per marker, ``[len(layers), d]``: the mean over ``messages`` of the residual stream at the
    prompt's last position with the marker's instruction after the message, minus without it."""
    if not messages or not layers:
        raise ValueError("need messages and layers")
    unknown = [m for m in markers if m not in MARKER_INSTRUCTIONS]
    if unknown:
        raise ValueError(f"unknown markers {unknown} (known: {list(MARKER_INSTRUCTIONS)})")

    def states(marker: str | None) -> torch.Tensor:
        msgs, sys_turn = instructed_prompts(messages, system, marker, "user")
        prompts = [chat_prompt(tok, m, sys_turn) for m in msgs]
        return capture(model, tok, prompts, list(layers), "residual", batch_size=batch_size, reduce="last")

    plain = states(None)
    return {m: (states(m) - plain).mean(0) for m in markers}


def marker_steer(
    directions: dict[str, torch.Tensor], markers: Sequence[str], strength: float
) -> torch.Tensor | None:
    """``strength`` × the sum of the markers' directions (``[L, d]``); None without markers."""
    if not markers:
        return None
    return strength * torch.stack([directions[m].float() for m in markers]).sum(0)


def marker_edit(layers: Sequence[int], steer: torch.Tensor) -> Edit:
    """An additive residual-stream edit adding ``steer[i]`` at ``layers[i]``."""
    return Edit.additive(layers, steer, site="residual")


def with_marker_part(edit: Edit | None, layers: Sequence[int], steer: torch.Tensor | None) -> Edit | None:
    """``edit`` with a marker part added: one additive edit over the union of both layer sets,
    whose steering vector at a shared layer is the sum of the two. ``edit`` None: the marker part
    alone; ``steer`` None: ``edit`` itself (the same object)."""
    if steer is None:
        return edit
    if edit is None:
        return marker_edit(layers, steer)
    if edit.steer is None or edit.site != "residual":
        raise ValueError(
            f"a marker part adds to additive residual-stream edits, not a {edit.form} edit at {edit.site!r}"
        )
    out_layers = sorted(set(edit.layers) | set(layers))
    d = edit.steer.shape[-1]
    total = torch.zeros(len(out_layers), d)
    for source_layers, source in ((edit.layers, edit.steer), (list(layers), steer)):
        for i, layer in enumerate(source_layers):
            total[out_layers.index(layer)] += source[i].float()
    return Edit.additive(out_layers, total, site=edit.site, renorm=edit.renorm, rank=edit.theta_p.shape[1])
