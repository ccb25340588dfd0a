"""The OpenAI-compatible wire format: request bodies, response bodies, errors, what is refused.

Plain pydantic, no web framework. The ingress (`chameleon.serving.app`) and the local path
(`chameleon.serving.local`) parse bodies with the request models, build the request's
`SamplingParams` once (`RequestBody.sampling_params`), and answer with the response models
(`ChatCompletion`, `Completion`, their stream chunks, `ErrorBody`, ...), encoded by `json_bytes`
and `sse_line`: no response body is written as a dict anywhere else.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from chameleon.data.ids import ID_RULE, is_valid_id
from chameleon.serving.sampling import SamplingParams

USER_MAX_CHARS = 256
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 128


class ApiError(Exception):
    """A request that gets a 4xx/5xx with body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        param: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status)

    def body(self) -> ErrorBody:
        return ErrorBody(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 413:
        return "request_too_large"
    if status < 500:
        return "invalid_request_error"
    if status == 503:
        return "service_unavailable"
    return "internal_error"


class Personalization(BaseModel):
    """The extension field `personalization` (openai client: `extra_body={"personalization": ...}`)."""

    model_config = ConfigDict(extra="forbid")

    group_id: str | None = None
    """Apply this group's edit (of the run being served) instead of the user's assignment."""
    off: bool = False
    """No edit at all: the base model's answer."""


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


UNSUPPORTED_PARAMETERS = {  # would change the answer: refused rather than ignored
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: bool(v),
    "suffix": lambda v: v not in (None, ""),
    "logit_bias": lambda v: bool(v),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none"),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    # Structured output (vLLM's and Ray Serve LLM's names): no constrained decoding here.
    "structured_outputs": lambda v: bool(v),
    "guided_json": lambda v: v is not None,
    "guided_regex": lambda v: v is not None,
    "guided_choice": lambda v: v is not None,
    "guided_grammar": lambda v: v is not None,
    "guided_decoding_backend": lambda v: v is not None,
    "logits_processors": lambda v: bool(v),
    "bad_words": lambda v: bool(v),
    "allowed_token_ids": lambda v: v is not None,
    "prompt_logprobs": lambda v: v is not None,
    "use_beam_search": lambda v: bool(v),
    "length_penalty": lambda v: v not in (None, 1, 1.0),
    "truncate_prompt_tokens": lambda v: v is not None,
    "skip_special_tokens": lambda v: v not in (None, True),
    "spaces_between_special_tokens": lambda v: v not in (None, True),
    "include_stop_str_in_output": lambda v: bool(v),
    "add_generation_prompt": lambda v: v not in (None, True),
    "continue_final_message": lambda v: bool(v),
    "add_special_tokens": lambda v: v is not None,
    "chat_template": lambda v: v is not None,
    "documents": lambda v: bool(v),
    "parallel_tool_calls": lambda v: v not in (None, False),
    "modalities": lambda v: v not in (None, ["text"]),
    "audio": lambda v: v is not None,
    "prediction": lambda v: v is not None,
    "reasoning_effort": lambda v: v is not None,
}
"""Parameter name -> whether its value asks for something this server does not do (400, never
silently ignored). Fields outside this table and the model are ignored only when they cannot
change the answer (`metadata`, `store`, `service_tier`, ...)."""

TEMPLATE_KWARGS = {"enable_thinking": (True, False), "add_generation_prompt": (True,)}
"""The `chat_template_kwargs` a request may set, and their allowed values: switches that
templates document and that cannot inject text. Anything else (`chat_template`, a raw Jinja
template the replica would render; `tools`; `documents`; unknown keys) gets 400, as in vLLM
since GHSA-6fvq-23cw-5628. `add_generation_prompt` is always on here, as at the top level."""
MAX_STOP_TOKEN_IDS = 16


class RequestBody(BaseModel):
    """Fields shared by chat and text completions. Unknown fields are ignored (clients send
    many); fields that would change the answer and are not supported are refused in `check`."""

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[Literal["chat", "completion"]]

    model: str
    """The served model's name, or `<name>:<group>` for a group's edit (as `personalization.group_id`)."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """None: the model's generation config, else 1 (as OpenAI)."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """Extension (vLLM): keep the k most likely tokens; 0 or -1 = all."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    """Extension (vLLM): drop tokens below min_p × the most likely token's probability."""
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    """Extension (vLLM, transformers): > 1 discourages tokens of the prompt and the output."""
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop_token_ids: list[int] | None = None
    """Extension (vLLM): end on these token ids (not part of the text), besides end-of-sequence."""
    min_tokens: int | None = Field(None, ge=0)
    """Extension (vLLM): no end-of-sequence or stop token id before this many tokens."""
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    """Selects the user's group (the run's assignments)."""
    safety_identifier: str | None = None
    """OpenAI's successor of `user`: used the same way when `user` is absent."""
    personalization: Personalization | None = None
    return_token_ids: bool = False
    """Extension (as in vLLM): add the generated token ids to the choice."""
    ignore_eos: bool = False
    """Extension (as in vLLM): keep generating past the end-of-sequence token (benchmarks)."""

    def check(self) -> None:
        if self.user is None and self.safety_identifier is not None:
            self.user = self.safety_identifier
        extra = self.model_extra or {}
        for name, unsupported in UNSUPPORTED_PARAMETERS.items():
            if name in extra and unsupported(extra[name]):
                raise ApiError(
                    400,
                    f"parameter {name!r} is not supported by this server",
                    "unsupported_parameter",
                    param=name,
                )
        if self.n != 1:
            raise ApiError(
                400,
                f"n={self.n} is not supported: this server returns one choice (n=1)",
                "unsupported_parameter",
                param="n",
            )
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ApiError(400, "seed must fit in a signed 64-bit integer", "invalid_value", param="seed")
        if self.user is not None and (
            not self.user
            or len(self.user) > USER_MAX_CHARS
            or any(ord(c) < 32 or ord(c) == 127 for c in self.user)
        ):
            raise ApiError(
                400, f"user must be 1-{USER_MAX_CHARS} printable characters", "invalid_value", param="user"
            )
        p = self.personalization
        if p is not None and p.group_id is not None and not is_valid_id(p.group_id):
            raise ApiError(
                400,
                f"invalid group id {p.group_id[:140]!r}: use {ID_RULE}",
                "invalid_value",
                param="personalization.group_id",
            )

    def select_group(self, group: str | None) -> None:
        """Apply the group named in `model` (`<name>:<group>`)."""
        if group is None:
            return
        if not is_valid_id(group):
            raise ApiError(
                400,
                f"invalid group id {group[:140]!r} in model: use {ID_RULE}",
                "invalid_value",
                param="model",
            )
        p = self.personalization
        if p is not None and p.group_id not in (None, group):
            raise ApiError(
                400,
                f"model names group {group!r} but personalization.group_id is {p.group_id!r}",
                "invalid_value",
                param="model",
            )
        if p is not None and p.off:
            raise ApiError(
                400, "model names a group but personalization.off is true", "invalid_value", param="model"
            )
        self.personalization = Personalization(group_id=group)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", "invalid_value", param="stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(
                400, f"stop sequences must be 1-{MAX_STOP_CHARS} characters", "invalid_value", param="stop"
            )
        return stops

    def stop_ids(self) -> list[int]:
        ids = list(self.stop_token_ids or [])
        if len(ids) > MAX_STOP_TOKEN_IDS or any(t < 0 for t in ids):
            raise ApiError(
                400,
                f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} non-negative token ids",
                "invalid_value",
                param="stop_token_ids",
            )
        return ids

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self) -> SamplingParams:
        """The request's sampling settings (stop lists checked here); unset ones stay None for the
        replica to resolve against the model (`SamplingParams.resolved`)."""
        return SamplingParams(
            max_tokens=self.requested_max_tokens(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            stop=tuple(self.stops()),
            stop_token_ids=tuple(self.stop_ids()),
            min_tokens=self.min_tokens or 0,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            n=self.n,
        )


class ChatRequest(RequestBody):
    kind: ClassVar[Literal["chat", "completion"]] = "chat"
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    """Extension (vLLM): extra variables for the model's chat template (e.g. `enable_thinking`)."""

    def template_kwargs(self) -> dict[str, Any] | None:
        kw = self.chat_template_kwargs or None
        if not kw:
            return None
        unknown = sorted(k for k in kw if k not in TEMPLATE_KWARGS)
        if unknown:
            raise ApiError(
                400,
                f"chat_template_kwargs may only set {sorted(TEMPLATE_KWARGS)}; "
                f"not supported: {[k[:40] for k in unknown[:5]]}",
                "unsupported_parameter",
                param="chat_template_kwargs",
            )
        for k, v in kw.items():
            if not any(v is ok for ok in TEMPLATE_KWARGS[k]):
                raise ApiError(
                    400,
                    f"chat_template_kwargs.{k} must be one of {list(TEMPLATE_KWARGS[k])}",
                    "invalid_value",
                    param=f"chat_template_kwargs.{k}",
                )
        return dict(kw)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise ApiError(
                            400,
                            f"messages[{i}]: only text content parts are supported (got {part.type!r})",
                            "unsupported_content",
                            param=f"messages[{i}].content",
                        )
                    texts.append(part.text)
                content = "".join(texts)
            elif m.content is None:
                raise ApiError(
                    400, f"messages[{i}] has no content", "invalid_value", param=f"messages[{i}].content"
                )
            else:
                content = m.content
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out


class CompletionRequest(RequestBody):
    kind: ClassVar[Literal["chat", "completion"]] = "completion"
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(
                400, "exactly one prompt per request is supported", "unsupported_parameter", param="prompt"
            )
        return self.prompt[0]


def check_text(data: Any) -> None:
    """400 for any string of a parsed body (keys included) that is not valid Unicode, such as a
    lone surrogate (`"\\ud800"` is valid JSON): it could be neither tokenized nor sent back, so
    it is refused before any work."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        obj, where = stack.pop()
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    400,
                    f"{where or 'the body'} contains text that is not valid Unicode (a lone surrogate)",
                    "invalid_text",
                    param=where or None,
                ) from None
        elif isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((k, where or "body"))
                label = k[:40] if k.isascii() and k.isprintable() else ascii(k[:40])  # never echo bad text
                stack.append((v, f"{where}.{label}" if where else label))
        elif isinstance(obj, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(obj))


def decode_body(body: bytes) -> dict[str, Any]:
    """A request body's JSON object: 400 for invalid JSON, a non-object, or undecodable text."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"request body is not valid JSON: {str(exc)[:200]}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    check_text(data)
    return data


def parse_request(cls: type[RequestBody], data: dict[str, Any], served: str, max_tokens_limit: int) -> Any:
    """A validated request of `cls` for the model named `served` (ApiError 4xx otherwise)."""
    try:
        req = cls.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc), "invalid_request_body") from None
    req.check()
    base, group = split_model(req.model, served)
    if base != served:
        raise ApiError(
            404,
            f"model {req.model[:200]!r} does not exist; this server serves {served!r} "
            f"(and '{served}:<group>' for a group's edit)",
            "model_not_found",
            param="model",
        )
    req.select_group(group)
    asked = req.requested_max_tokens()
    if asked is not None and asked > max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens={asked} exceeds this server's limit of {max_tokens_limit}",
            "max_tokens_too_large",
            param="max_tokens",
        )
    return req


def split_model(model: str, served: str) -> tuple[str, str | None]:
    """(`model` without its group, the group) for `<served>:<group>`; other names unchanged."""
    if model.startswith(served + ":"):
        return served, model[len(served) + 1 :]
    return model, None


def validation_message(exc: ValidationError) -> str:
    """A short, readable summary of a request body's validation errors (the first five)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request body: " + "; ".join(parts)


# -- what a client sees of answers and errors --------------------------------------------------------

_PUBLIC_5XX = frozenset(
    {
        "no_run",
        "edit_loading",
        "edit_slots_busy",
        "store_unavailable",
        "artifact_error",
        "replica_unavailable",
        "server_overloaded",
        "engine_unavailable",
    }
)
"""Codes of 5xx errors whose messages are written for clients (no internals in them)."""


def public_error(exc: ApiError) -> ApiError:
    """What a client sees of an error: 5xx messages other than the ones written for clients are
    replaced, so exception text (store URIs, hosts, key ids, group ids) never reaches a body."""
    if exc.status < 500 or exc.code in _PUBLIC_5XX:
        return exc
    return ApiError(
        exc.status, "internal error; the server log has the details", exc.code or "internal_error"
    )


def timeout_error(seconds: float) -> ApiError:
    return ApiError(408, f"the request took longer than {seconds:g} s", "request_timeout")


# -- response bodies ---------------------------------------------------------------------------------


def _absent(value: Any) -> bool:
    return value is None


class WireModel(BaseModel):
    """A response body or part of one: fields in the order clients see them; a field declared
    with `exclude_if=_absent` is left out of the body when None (OpenAI's optional fields)."""

    model_config = ConfigDict(extra="forbid")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ErrorDetail(WireModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(WireModel):
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers errors."""

    error: ErrorDetail


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class PersonalizationDetail(WireModel):
    """The extension field `personalization` of every answer: which edit produced it (what a
    caller may see of it: `access.public_personalization`)."""

    run_id: str | None
    group_id: str | None
    source: Literal["user", "group", "fallback", "off"]
    """`user` (assignment), `group` (named in the request), `fallback`, or `off`."""
    user: str | None

    def headers(self) -> dict[str, str]:
        """The `x-chameleon-*` headers of an answer."""
        return {"x-chameleon-run": self.run_id or "none", "x-chameleon-group": self.group_id or "none"}


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(WireModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    stop_reason: str | int | None
    """The stop string or stop token id that ended the answer (vLLM's extension)."""
    logprobs: None = None
    token_ids: list[int] | None = Field(None, exclude_if=_absent)
    """Extension (vLLM): only when the request set `return_token_ids`."""


class CompletionChoice(WireModel):
    index: int = 0
    text: str
    finish_reason: str
    stop_reason: str | int | None
    logprobs: None = None
    token_ids: list[int] | None = Field(None, exclude_if=_absent)


class _AnswerBody(WireModel):
    """What every answer body has, in this order; subclasses narrow `object` and `choices`."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None
    choices: list
    usage: Usage | None = Field(None, exclude_if=_absent)
    """Whole answers: always. Streams: only in the extra last chunk that
    `stream_options.include_usage` asks for (with no choices)."""
    personalization: PersonalizationDetail


class ChatCompletion(_AnswerBody):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Completion(_AnswerBody):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(WireModel):
    """What a chunk adds to the message: the role in the first chunk only, content when there is some."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_absent)
    content: str | None = Field(None, exclude_if=_absent)


class _StreamChoice(WireModel):
    """A streamed choice: its `stop_reason` is sent in the final chunk only (the one with a
    finish reason). Subclasses declare the fields, in the order clients see them."""

    @model_serializer(mode="wrap")
    def _stop_reason_when_finished(self, handler) -> dict[str, Any]:
        out = handler(self)
        if out.get("finish_reason") is None:
            out.pop("stop_reason", None)
        return out


class ChatChunkChoice(_StreamChoice):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_absent)


class CompletionChunkChoice(_StreamChoice):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_absent)


class ChatCompletionChunk(_AnswerBody):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_AnswerBody):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ModelCard(WireModel):
    """One entry of `/v1/models`: the base model, or `<model>:<group>` for a group's edit."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "chameleon"
    root: str
    parent: str | None
    run_id: str | None = Field(None, exclude_if=_absent)
    """The run the group belongs to (group entries only)."""


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthBody(WireModel):
    """`/healthz` (and `/status` when the replica does not answer)."""

    status: Literal["ok", "degraded", "unavailable"]
    problems: list[str] | None = Field(None, exclude_if=_absent)


def json_bytes(body: WireModel) -> bytes:
    """A JSON body as the app sends it (Starlette's `JSONResponse` encoding)."""
    return json.dumps(
        body.wire(), ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode()


def sse_line(body: WireModel) -> str:
    """One server-sent event (the OpenAI streaming wire format)."""
    return f"data: {json.dumps(body.wire(), ensure_ascii=False)}\n\n"
