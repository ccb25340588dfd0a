"""A request answered in process, as the HTTP app answers it, without Ray or Serve.

`answer(core, kind, body)` runs the app's own steps on a raw request body: decoding and
validation (`protocol.decode_body`, `parse_request`), the replica's events (`ModelServer.events`:
admission, the edit cache, the engine), the public error and personalization rules, and the
response body or stream chunks, encoded as the app encodes them. The API fuzz (tests) and
jobs/bench/serve_faults.py drive the endpoint's logic through it thousands of times in seconds;
what only the ingress does (auth, size limits, timeouts, Serve's queues) is tested over HTTP.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from chameleon.serving.access import public_personalization
from chameleon.serving.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    decode_body,
    generation_payload,
    json_bytes,
    parse_request,
    public_error,
    response_headers,
    sse_line,
    stream_head,
    usage_of,
)
from chameleon.serving.replica import ModelServer


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


def _error(exc: ApiError) -> Reply:
    body = public_error(exc).body()
    return Reply(exc.status, {}, body, [], json_bytes(body))


async def answer(core: ModelServer, kind: str, body: bytes) -> Reply:
    """The app's answer to POST /v1/chat/completions (`kind` chat) or /v1/completions."""
    try:
        return await _answer(core, kind, body)
    except ApiError as exc:
        return _error(exc)
    except Exception as exc:  # the app would answer 500 (a defect)
        return Reply(500, {}, None, [], b"", exc)


async def _answer(core: ModelServer, kind: str, body: bytes) -> Reply:
    cfg = core.cfg
    cls = ChatRequest if kind == "chat" else CompletionRequest
    req = parse_request(cls, decode_body(body), cfg.model_name, cfg.max_tokens_limit)
    payload = generation_payload(req, kind)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    async with contextlib.aclosing(core.events(payload)) as events:
        start = await anext(events)
        if start["type"] == "error":
            raise ApiError.from_event(start)
        pers = public_personalization(start["personalization"], cfg.personalization_detail)
        headers = response_headers(pers)
        fingerprint = start.get("system_fingerprint")
        if req.stream:
            head = stream_head(req, kind, rid, created, fingerprint)
            chunks = [chunk_body(req, kind, head, pers, "", None, first=True)] if kind == "chat" else []
            async for ev in events:
                if ev["type"] == "delta":
                    chunks.append(chunk_body(req, kind, head, pers, ev["text"], None, ev["token_ids"]))
                elif ev["type"] == "end":
                    chunks.append(
                        chunk_body(
                            req, kind, head, pers, None, ev["finish_reason"], [], False, ev.get("stop_reason")
                        )
                    )
                    if req.include_usage():
                        chunks.append(
                            {**head, "choices": [], "usage": usage_of(start, ev), "personalization": pers}
                        )
                    break
                elif ev["type"] == "error":
                    chunks.append(public_error(ApiError.from_event(ev)).body())
            raw = "".join(sse_line(c) for c in chunks).encode() + b"data: [DONE]\n\n"
            return Reply(200, headers, None, chunks, raw)
        text, ids, end = "", [], None
        async for ev in events:
            if ev["type"] == "delta":
                text += ev["text"]
                ids += ev["token_ids"]
            elif ev["type"] == "end":
                end = ev
                break
            elif ev["type"] == "error":
                raise ApiError.from_event(ev)
    if end is None:
        raise ApiError(500, "the model replica ended the response early", "internal_error")
    out = completion_body(req, kind, rid, created, fingerprint, text, ids, end, usage_of(start, end), pers)
    return Reply(200, headers, out, [], json_bytes(out))
