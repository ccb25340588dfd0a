"""`chameleon.serving.protocol`'s response models: the bodies clients read, field for field."""

from __future__ import annotations

import json

from chameleon.serving import protocol as wire

PERS = wire.PersonalizationDetail(run_id="r1", group_id=None, source="user", user="u")
HEAD = {"id": "chatcmpl-1", "created": 7, "model": "m", "system_fingerprint": "r1@ab"}


def test_a_chat_completion_has_openais_fields_in_order():
    choice = wire.ChatChoice(
        message=wire.AssistantMessage(content="hi"), finish_reason="stop", stop_reason=None
    )
    body = wire.ChatCompletion(choices=[choice], usage=wire.Usage.of(3, 2), personalization=PERS, **HEAD)
    assert json.loads(wire.json_bytes(body)) == body.wire()
    assert list(body.wire()) == [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
        "personalization",
    ]
    assert body.wire()["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "finish_reason": "stop",
            "stop_reason": None,
            "logprobs": None,
        }
    ], "token_ids only when asked for"
    assert body.wire()["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body.wire()["object"] == "chat.completion"
    with_ids = choice.model_copy(update={"token_ids": [4, 5]}).wire()
    assert with_ids["token_ids"] == [4, 5]


def test_stream_choices_carry_stop_reason_in_the_final_chunk_only():
    opening = wire.ChatChunkChoice(delta=wire.ChatDelta(role="assistant", content=""))
    assert opening.wire() == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": None,
        "logprobs": None,
    }
    assert wire.ChatChunkChoice(delta=wire.ChatDelta()).wire()["delta"] == {}, "no text: an empty delta"
    final = wire.CompletionChunkChoice(text="", finish_reason="stop", stop_reason=None, token_ids=[])
    assert final.wire() == {
        "index": 0,
        "text": "",
        "finish_reason": "stop",
        "logprobs": None,
        "stop_reason": None,
        "token_ids": [],
    }


def test_a_usage_chunk_has_no_choices_and_a_usage():
    chunk = wire.ChatCompletionChunk(choices=[], usage=wire.Usage.of(1, 1), personalization=PERS, **HEAD)
    assert chunk.wire()["object"] == "chat.completion.chunk" and chunk.wire()["choices"] == []
    assert "usage" not in wire.ChatCompletionChunk(choices=[], personalization=PERS, **HEAD).wire()
    line = wire.sse_line(chunk)
    assert line.startswith("data: {") and line.endswith("}\n\n")


def test_errors_models_and_health():
    assert wire.ApiError(404, "no", "model_not_found", param="model").body().wire() == {
        "error": {"message": "no", "type": "not_found_error", "param": "model", "code": "model_not_found"}
    }
    cards = wire.ModelList(
        data=[
            wire.ModelCard(id="m", root="path", parent=None),
            wire.ModelCard(id="m:g", root="path", parent="m", run_id="r1"),
        ]
    ).wire()
    assert cards["object"] == "list"
    assert cards["data"][0] == {
        "id": "m",
        "object": "model",
        "created": 0,
        "owned_by": "chameleon",
        "root": "path",
        "parent": None,
    }
    assert cards["data"][1]["run_id"] == "r1"
    assert wire.HealthBody(status="ok").wire() == {"status": "ok"}


def test_personalization_headers():
    assert PERS.headers() == {"x-chameleon-run": "r1", "x-chameleon-group": "none"}
