"""From the replica's events to the OpenAI answer: one place for the Serve app and the local path.

`Answer` holds what every part of one answer repeats (id, time, model, fingerprint, the public
personalization) and builds the response models of chameleon.serving.protocol from the replica's
events (chameleon.serving.replica_api): the whole body (`completion`, after `collect`) or the
stream's chunks (`opening_chunks`, then `chunks_for` per event). The app adds what only HTTP has
(deadlines, a replica that dies, server-sent events); `local.answer` runs the same steps in process.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from chameleon.serving.access import public_personalization
from chameleon.serving.protocol import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    ErrorBody,
    RequestBody,
    Usage,
    WireModel,
    public_error,
)
from chameleon.serving.replica_api import Failed, Finished, Generated, ReplicaEvent, Started

Chunk = ChatCompletionChunk | CompletionChunk


class Answer:
    """The response to one request, from its `Started` event on."""

    def __init__(self, body: RequestBody, started: Started, request_id: str, detail: str) -> None:
        self.body = body
        self.chat = body.kind == "chat"
        self.started = started
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.personalization = public_personalization(started.personalization, detail)

    def headers(self) -> dict[str, str]:
        return self.personalization.headers()

    def _head(self) -> dict[str, Any]:
        """The fields every body of this answer repeats (keyword arguments of its models)."""
        return {
            "id": self.id,
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": self.started.system_fingerprint,
            "personalization": self.personalization,
        }

    def _ids(self, token_ids: tuple[int, ...] | list[int] | None) -> list[int] | None:
        return list(token_ids) if token_ids is not None and self.body.return_token_ids else None

    def _usage(self, end: Finished) -> Usage:
        return Usage.of(self.started.prompt_tokens, end.completion_tokens)

    def completion(self, text: str, token_ids: list[int], end: Finished) -> ChatCompletion | Completion:
        """The whole (non-streamed) answer."""
        ending = _ending(end)
        ids = self._ids(token_ids)
        if self.chat:
            choice = ChatChoice(message=AssistantMessage(content=text), token_ids=ids, **ending)
            return ChatCompletion(choices=[choice], usage=self._usage(end), **self._head())
        choice = CompletionChoice(text=text, token_ids=ids, **ending)
        return Completion(choices=[choice], usage=self._usage(end), **self._head())

    def _chunk(
        self,
        text: str | None,
        token_ids: tuple[int, ...] | None = None,
        end: Finished | None = None,
        opening: bool = False,
    ) -> Chunk:
        ending = _ending(end)
        ids = self._ids(token_ids)
        if self.chat:
            delta = (
                ChatDelta(role="assistant", content=text or "")
                if opening
                else ChatDelta(content=text or None)
            )
            choice = ChatChunkChoice(delta=delta, token_ids=ids, **ending)
            return ChatCompletionChunk(choices=[choice], **self._head())
        return CompletionChunk(
            choices=[CompletionChunkChoice(text=text or "", token_ids=ids, **ending)], **self._head()
        )

    def opening_chunks(self) -> list[Chunk]:
        """What a stream sends before any event: the assistant's role (chat only)."""
        return [self._chunk("", opening=True)] if self.chat else []

    def chunks_for(self, event: ReplicaEvent) -> tuple[list[WireModel], bool]:
        """The stream's bodies for one event after `Started`, and whether the stream is done:
        text; the final chunk (and the usage chunk `stream_options.include_usage` asks for); or
        the error body (what a client may see of it) — the stream goes on to the next event."""
        if isinstance(event, Generated):
            return [self._chunk(event.text, event.token_ids)], False
        if isinstance(event, Finished):
            out: list[WireModel] = [self._chunk(None, (), end=event)]
            if self.body.include_usage():
                model = ChatCompletionChunk if self.chat else CompletionChunk
                out.append(model(choices=[], usage=self._usage(event), **self._head()))
            return out, True
        if isinstance(event, Failed):
            return [error_body(event.error())], False
        raise TypeError(f"unexpected replica event after the start: {event!r}")


def _ending(end: Finished | None) -> dict[str, Any]:
    """A choice's `finish_reason` and `stop_reason` (keyword arguments; none before the end)."""
    return {} if end is None else {"finish_reason": end.finish_reason, "stop_reason": end.stop_reason}


def error_body(exc: ApiError) -> ErrorBody:
    """The body of an error as a client sees it (`protocol.public_error`)."""
    return public_error(exc).body()


def started_or_raise(event: ReplicaEvent) -> Started:
    """The replica's first event: `Started`, or its error raised as `ApiError`."""
    if isinstance(event, Failed):
        raise event.error()
    if not isinstance(event, Started):
        raise ApiError(500, "the model replica did not start the response", "internal_error")
    return event


async def collect(next_event: Callable[[], Awaitable[ReplicaEvent]]) -> tuple[str, list[int], Finished]:
    """A whole answer's text, token ids and end, from the events after `Started`
    (`next_event()` awaits the next one). An error event is raised as its `ApiError`; events
    that stop before the end are a 500."""
    text, ids = "", []
    while True:
        try:
            event = await next_event()
        except StopAsyncIteration:
            raise ApiError(500, "the model replica ended the response early", "internal_error") from None
        if isinstance(event, Generated):
            text += event.text
            ids += event.token_ids
        elif isinstance(event, Finished):
            return text, ids, event
        elif isinstance(event, Failed):
            raise event.error()
