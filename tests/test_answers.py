"""`chameleon.serving.answers`: the replica's events become the same answer for app and local path."""

from __future__ import annotations

import asyncio

import pytest

from chameleon.serving.answers import Answer, collect, started_or_raise
from chameleon.serving.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ErrorBody,
    PersonalizationDetail,
    parse_request,
)
from chameleon.serving.replica_api import Failed, Finished, Generated, Started

RESOLVED = PersonalizationDetail(run_id="r1", group_id="g7", source="user", user="alice")
STARTED = Started(RESOLVED, prompt_tokens=4, max_tokens=8, system_fingerprint="r1@ab")


def body(kind: str = "chat", **extra):
    cls = ChatRequest if kind == "chat" else CompletionRequest
    data = {
        "model": "m",
        **({"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "hi"}),
    }
    return parse_request(cls, {**data, **extra}, "m", 64)


def test_a_whole_answer():
    answer = Answer(body(return_token_ids=True), STARTED, "abc", "minimal")
    got = answer.completion("hello", [5, 6], Finished("stop", "END", 2)).wire()
    assert got["id"] == "chatcmpl-abc" and got["object"] == "chat.completion" and got["model"] == "m"
    assert got["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert (got["choices"][0]["stop_reason"], got["choices"][0]["token_ids"]) == ("END", [5, 6])
    assert got["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert got["personalization"] == {"run_id": "r1", "group_id": None, "source": "user", "user": "alice"}, (
        "minimal detail: the caller never learns the user's group"
    )
    assert answer.headers() == {"x-chameleon-run": "r1", "x-chameleon-group": "none"}
    full = Answer(body("completion"), STARTED, "abc", "full")
    assert full.id == "cmpl-abc" and full.personalization == RESOLVED


def test_a_stream_of_chunks():
    answer = Answer(body(stream=True, stream_options={"include_usage": True}), STARTED, "s", "full")
    (opening,) = answer.opening_chunks()
    assert opening.wire()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    (text,), done = answer.chunks_for(Generated("he", (1,)))
    assert not done and text.wire()["choices"][0]["delta"] == {"content": "he"}
    assert "token_ids" not in text.wire()["choices"][0], "not asked for"
    (err,), done = answer.chunks_for(Failed.of(ApiError(500, "boom at s3://secret", "internal_error")))
    assert not done and isinstance(err, ErrorBody) and "secret" not in err.error.message
    (final, usage), done = answer.chunks_for(Finished("length", None, 1))
    assert done and final.wire()["choices"][0]["finish_reason"] == "length"
    assert usage.wire()["choices"] == [] and usage.wire()["usage"]["total_tokens"] == 5
    assert {c.wire()["id"] for c in (opening, text, final, usage)} == {"chatcmpl-s"}
    completion = Answer(body("completion", stream=True), STARTED, "s", "full")
    assert completion.opening_chunks() == [], "text completions have no role chunk"


def test_collect_and_start():
    async def run(events):
        it = iter(events)

        async def next_event():
            try:
                return next(it)
            except StopIteration:
                raise StopAsyncIteration from None

        return await collect(next_event)

    text, ids, end = asyncio.run(run([Generated("a", (1,)), Generated("b", (2,)), Finished("stop", None, 2)]))
    assert (text, ids, end.completion_tokens) == ("ab", [1, 2], 2)
    with pytest.raises(ApiError, match="slots") as err:
        asyncio.run(run([Failed.of(ApiError(503, "edit slots busy", "edit_slots_busy"))]))
    assert err.value.status == 503
    with pytest.raises(ApiError, match="ended the response early"):
        asyncio.run(run([Generated("a", (1,))]))
    assert started_or_raise(STARTED) is STARTED
    with pytest.raises(ApiError, match="no run"):
        started_or_raise(Failed.of(ApiError(503, "no run", "no_run")))
