"""A request answered in process, as the HTTP app answers it, without Ray or Serve.

`answer(core, kind, body)` runs the app's own steps on a raw request body: decoding and
validation (`protocol.decode_body`, `parse_request`), the typed request the ingress sends
(`replica_api.GenerationRequest`), the replica's events (`ModelServer.events`: admission, the
edit cache, the engine), and the answer built from them (`answers.Answer`, the same as the app's),
encoded as the app encodes it. The API fuzz (tests) and jobs/bench/serve_faults.py drive the
endpoint's logic through it thousands of times in seconds; what only the ingress does (auth, size
limits, timeouts, Serve's queues) is tested over HTTP.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from chameleon.serving.answers import Answer, collect, error_body, started_or_raise
from chameleon.serving.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    decode_body,
    json_bytes,
    parse_request,
    sse_line,
)
from chameleon.serving.replica import ModelServer
from chameleon.serving.replica_api import GenerationRequest


@dataclass
class Reply:
    """What the app would send: status, headers, the JSON body or the stream's chunks, the bytes."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    chunks: list[dict[str, Any]] = field(default_factory=list)
    raw: bytes = b""
    exception: BaseException | None = None
    """An unexpected exception (the app would answer 500)."""


async def answer(core: ModelServer, kind: str, body: bytes) -> Reply:
    """The app's answer to POST /v1/chat/completions (`kind` chat) or /v1/completions."""
    try:
        return await _answer(core, kind, body)
    except ApiError as exc:
        err = error_body(exc)
        return Reply(exc.status, {}, err.wire(), [], json_bytes(err))
    except Exception as exc:  # the app would answer 500 (a defect)
        return Reply(500, {}, None, [], b"", exc)


async def _answer(core: ModelServer, kind: str, raw: bytes) -> Reply:
    cfg = core.cfg
    cls = ChatRequest if kind == "chat" else CompletionRequest
    body = parse_request(cls, decode_body(raw), cfg.model_name, cfg.max_tokens_limit)
    request = GenerationRequest.from_body(body)
    async with contextlib.aclosing(core.events(request)) as events:
        started = started_or_raise(await anext(events))
        response = Answer(body, started, uuid.uuid4().hex, cfg.personalization_detail)
        if body.stream:
            chunks = response.opening_chunks()
            async for event in events:
                more, done = response.chunks_for(event)
                chunks += more
                if done:
                    break
            wire = "".join(sse_line(c) for c in chunks).encode() + b"data: [DONE]\n\n"
            return Reply(200, response.headers(), None, [c.wire() for c in chunks], wire)
        text, ids, end = await collect(lambda: anext(events))
    out = response.completion(text, ids, end)
    return Reply(200, response.headers(), out.wire(), [], json_bytes(out))
