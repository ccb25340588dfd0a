"""`chameleon.serving.replica_api`: the typed request the ingress sends and the events it reads."""

from __future__ import annotations

import pickle

import pytest

from chameleon.serving.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    PersonalizationDetail,
    parse_request,
)
from chameleon.serving.replica_api import (
    ChatTurn,
    Failed,
    Finished,
    Generated,
    GenerationRequest,
    Started,
)
from chameleon.serving.sampling import SamplingParams

MODEL = "tiny"


def chat(**body) -> ChatRequest:
    data = {
        "model": MODEL,
        "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
    }
    return parse_request(ChatRequest, {**data, **body}, MODEL, max_tokens_limit=64)


def test_a_chat_body_becomes_one_typed_request():
    req = GenerationRequest.from_body(
        chat(
            max_completion_tokens=9,
            temperature=0.2,
            stop="END",
            stop_token_ids=[3],
            user="u1",
            stream=True,
            return_token_ids=True,
            chat_template_kwargs={"enable_thinking": False},
        )
    )
    assert req.kind == "chat"
    assert req.messages == (ChatTurn("system", "be brief"), ChatTurn("user", "hi"))
    assert req.params == SamplingParams(max_tokens=9, temperature=0.2, stop=("END",), stop_token_ids=(3,))
    assert (req.user, req.stream, req.return_token_ids) == ("u1", True, True)
    assert dict(req.chat_template_kwargs) == {"enable_thinking": False}
    assert (req.group_id, req.personalization_off) == (None, False)
    assert req.prompt_chars() == len("systembe brief") + len("userhi") and req.prompt_param == "messages"


def test_the_group_comes_from_the_model_name_or_the_personalization_field():
    assert GenerationRequest.from_body(chat(model=f"{MODEL}:g1")).group_id == "g1"
    assert GenerationRequest.from_body(chat(personalization={"group_id": "g2"})).group_id == "g2"
    assert GenerationRequest.from_body(chat(personalization={"off": True})).personalization_off


def test_a_completion_body_and_its_refusals():
    body = parse_request(CompletionRequest, {"model": MODEL, "prompt": ["once"]}, MODEL, 64)
    req = GenerationRequest.from_body(body)
    assert (req.kind, req.prompt, req.messages, req.params) == ("completion", "once", (), SamplingParams())
    with pytest.raises(ApiError, match="stop sequences") as err:
        GenerationRequest.from_body(chat(stop=["a"] * 5))
    assert err.value.param == "stop"


def test_requests_and_events_cross_a_process_boundary_unchanged():
    """Ray pickles what crosses the handle."""
    pers = PersonalizationDetail(run_id="r", group_id=None, source="fallback", user="u")
    things = [
        GenerationRequest.from_body(chat(seed=5)),
        Started(pers, prompt_tokens=3, max_tokens=4, system_fingerprint="r@abc"),
        Generated("hé", (1, 2)),
        Finished("stop", "END", 2),
        Failed.of(ApiError(404, "no such group", "group_not_found", param="personalization.group_id")),
    ]
    assert [pickle.loads(pickle.dumps(t)) for t in things] == things


def test_a_failure_is_the_same_api_error_on_the_other_side():
    exc = ApiError(503, "busy", "edit_slots_busy")
    back = Failed.of(exc).error()
    assert (back.status, back.message, back.code, back.param, back.type) == (
        503,
        "busy",
        "edit_slots_busy",
        None,
        exc.type,
    )
