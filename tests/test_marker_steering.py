"""core.marker_steering on the tiny random model: a marker direction is the state change the
instruction makes where the answer starts, and a marker part adds to a served edit layer by layer."""

from __future__ import annotations

import pytest
import torch
from tiny_models import embedded_tokenizer, tiny_llama

from chameleon.core.capture import capture
from chameleon.core.edit import Edit
from chameleon.core.generation import chat_prompt, generate_answers
from chameleon.core.marker_steering import (
    MARKER_INSTRUCTIONS,
    default_marker_layers,
    instruction_directions,
    marker_edit,
    marker_steer,
    with_marker_part,
)
from chameleon.core.prompts import PARAPHRASE_TWEET

MESSAGES = [PARAPHRASE_TWEET + t for t in ("Great game tonight!", "so tired of this rain", "New phone.")]
LAYERS = [1, 3]
SYSTEM = "Answer with the tweet only."


@pytest.fixture(scope="module")
def setup():
    tok = embedded_tokenizer()
    return tiny_llama(tok), tok


def _last_states(model, tok, message: str) -> torch.Tensor:
    return capture(model, tok, [chat_prompt(tok, message, SYSTEM)], LAYERS, "residual", reduce="last")[0]


def test_a_direction_is_the_mean_change_the_instruction_after_the_message_makes(setup):
    model, tok = setup
    got = instruction_directions(model, tok, MESSAGES[:2], ["hashtag", "emoticon"], LAYERS, system=SYSTEM)
    assert set(got) == {"hashtag", "emoticon"} and got["hashtag"].shape == (2, model.config.hidden_size)
    for marker in ("hashtag", "emoticon"):
        changes = [
            _last_states(model, tok, f"{m}\n\n{MARKER_INSTRUCTIONS[marker]}") - _last_states(model, tok, m)
            for m in MESSAGES[:2]
        ]
        assert torch.allclose(got[marker], torch.stack(changes).mean(0), atol=1e-4)
    assert not torch.allclose(got["hashtag"], got["emoticon"]), "each marker has its own direction"


def test_unknown_markers_and_empty_inputs_are_refused(setup):
    model, tok = setup
    with pytest.raises(ValueError, match="need messages"):
        instruction_directions(model, tok, [], ["hashtag"], LAYERS, system=SYSTEM)
    with pytest.raises(ValueError, match="unknown markers"):
        instruction_directions(model, tok, MESSAGES, ["caps"], LAYERS, system=SYSTEM)


def test_the_marker_edit_adds_its_steer_at_every_layer(setup):
    model, tok = setup
    direction = instruction_directions(model, tok, MESSAGES[:1], ["hashtag"], LAYERS, system=SYSTEM)[
        "hashtag"
    ]
    edit = marker_edit(LAYERS, 0.5 * direction)
    assert edit.layers == LAYERS and edit.site == "residual" and edit.form == "additive"
    assert torch.equal(edit.steer, 0.5 * direction)

    def answers(edit=None):
        edits = None if edit is None else [edit] * len(MESSAGES)
        return generate_answers(model, tok, MESSAGES, system=SYSTEM, edits=edits, max_new_tokens=6)

    base = answers()
    assert answers(marker_edit(LAYERS, 0.0 * direction)) == base
    assert answers(marker_edit(LAYERS, 200.0 * direction)) != base


def test_marker_steer_sums_the_users_markers_at_the_strength():
    directions = {"emoticon": torch.ones(2, 4), "hashtag": torch.full((2, 4), 2.0)}
    assert marker_steer(directions, [], 0.25) is None
    assert torch.equal(marker_steer(directions, ["emoticon"], 0.25), torch.full((2, 4), 0.25))
    assert torch.equal(marker_steer(directions, ["emoticon", "hashtag"], 0.5), torch.full((2, 4), 1.5))


def _additive(layers, values, site="residual") -> Edit:
    n, d = len(layers), 4
    return Edit(
        layers=layers, theta_p=torch.zeros(n, 1, d), theta_n=torch.zeros(n, d), mean=torch.zeros(n, d),
        site=site, steer=torch.tensor(values, dtype=torch.float32).reshape(n, 1).expand(n, d).clone(),
    )  # fmt: skip


def test_a_marker_part_joins_the_edit_over_the_union_of_layers():
    group = _additive([5], [1.0])
    part = torch.tensor([[10.0] * 4, [20.0] * 4])
    got = with_marker_part(group, [3, 5], part)
    assert got.layers == [3, 5] and got.site == "residual" and got.form == "additive"
    assert torch.equal(got.steer, torch.tensor([[10.0] * 4, [21.0] * 4])), "summed at the shared layer"
    assert with_marker_part(group, [3, 5], None) is group, "no markers: the same edit"
    alone = with_marker_part(None, [3, 5], part)
    assert alone.layers == [3, 5] and torch.equal(alone.steer, part)
    assert with_marker_part(None, [3], None) is None


def test_a_marker_part_is_refused_on_projection_or_mlp_edits():
    projection = Edit(
        layers=[1],
        theta_p=torch.ones(1, 1, 4),
        theta_n=torch.ones(1, 4),
        mean=torch.zeros(1, 4),
        site="residual",
    )
    with pytest.raises(ValueError, match="additive residual-stream"):
        with_marker_part(projection, [1], torch.ones(1, 4))
    with pytest.raises(ValueError, match="additive residual-stream"):
        with_marker_part(_additive([1], [1.0], site="mlp"), [1], torch.ones(1, 4))


def test_default_layers_are_every_third_from_three():
    assert default_marker_layers(30) == [3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert default_marker_layers(4) == [3] and default_marker_layers(3) == []
