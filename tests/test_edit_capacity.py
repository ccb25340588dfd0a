"""evaluation.edit_capacity on the tiny random model: the capacity is read only from readable
strengths, and the transfer is measured on the users whose history shows the marker."""

from __future__ import annotations

import pytest
from tiny_models import embedded_tokenizer, tiny_llama

from chameleon.core.marker_steering import instruction_directions
from chameleon.core.prompts import PARAPHRASE_TWEET
from chameleon.evaluation.edit_capacity import Answering, measure_edit_capacity, measure_edit_transfer
from chameleon.evaluation.names import NO_PREAMBLE

MESSAGES = [PARAPHRASE_TWEET + t for t in ("Great game tonight!", "so tired of this rain", "New phone.")]
LAYERS = [1, 3]


@pytest.fixture(scope="module")
def setup():
    tok = embedded_tokenizer()
    return tiny_llama(tok), tok


def test_capacity_is_read_from_readable_strengths_only(setup):
    model, tok = setup
    kw = dict(
        layers=LAYERS,
        markers=["hashtag", "lower_start"],
        answering=Answering(max_new_tokens=4, n_resamples=50),
    )
    res = measure_edit_capacity(model, tok, MESSAGES[:1], MESSAGES, strengths=[0.0, 200.0], **kw)
    assert res["layers"] == LAYERS and len(res["answers"]["none"]) == 3
    for m in ("hashtag", "lower_start"):
        at_zero = res["markers"][m]["by_strength"]["0"]
        assert at_zero["share"] == res["none"]["shares"][m], "strength 0 is the unedited model"
        assert at_zero["closeness"] == pytest.approx(res["none"]["closeness"])
        assert res["markers"][m]["capacity"] >= res["none"]["shares"][m]
    # Nothing readable: the capacity is the unedited share, at no strength.
    unreadable = measure_edit_capacity(
        model, tok, MESSAGES[:1], MESSAGES, strengths=[200.0], min_closeness=1.01, **kw
    )
    for m in ("hashtag", "lower_start"):
        assert unreadable["markers"][m] == {
            "by_strength": unreadable["markers"][m]["by_strength"],
            "capacity": unreadable["none"]["shares"][m],
            "at": None,
            "readable_capacity": unreadable["markers"][m]["readable_capacity"],
        }


def test_unknown_markers_and_empty_inputs_are_refused(setup):
    model, tok = setup
    with pytest.raises(ValueError, match="unknown"):
        measure_edit_capacity(
            model, tok, MESSAGES, MESSAGES, layers=LAYERS, strengths=[0.1], markers=["caps"]
        )
    with pytest.raises(ValueError, match="strengths"):
        measure_edit_capacity(model, tok, MESSAGES, MESSAGES, layers=LAYERS, strengths=[])
    with pytest.raises(ValueError, match="need messages"):
        instruction_directions(model, tok, [], ["hashtag"], LAYERS, system=NO_PREAMBLE)


def test_transfer_is_measured_on_the_users_whose_history_shows_the_marker(setup):
    model, tok = setup
    histories = [["so fun :)", "yay :D", "ok :)"], ["Fine.", "Good."], ["great :)", "nice :)"]]
    direction = instruction_directions(model, tok, MESSAGES[:1], ["emoticon"], LAYERS, system=NO_PREAMBLE)
    kw = dict(layers=LAYERS, directions=direction, answering=Answering(max_new_tokens=4, n_resamples=50))
    got = measure_edit_transfer(model, tok, MESSAGES, histories, strengths={"emoticon": 0.0}, **kw)
    assert got["emoticon"]["users"] == 2, "users 0 and 2 show emoticons, user 1 does not"
    e = got["emoticon"]
    assert e["edited_share"] == e["base_share"] and e["paired_gain"]["mean"] == 0.0, "strength 0 is base"
    assert e["edited_closeness"] == pytest.approx(e["base_closeness"])
    nobody = [["Fine."], ["Good."], ["Well."]]
    kw["directions"] = {"hashtag": direction["emoticon"]}
    assert measure_edit_transfer(model, tok, MESSAGES, nobody, strengths={"hashtag": 0.3}, **kw) == {
        "hashtag": {"users": 0, "strength": 0.3}
    }
    with pytest.raises(ValueError, match="histories"):
        measure_edit_transfer(model, tok, MESSAGES, histories[:2], strengths={"hashtag": 0.3}, **kw)
