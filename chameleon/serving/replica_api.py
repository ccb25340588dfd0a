"""What crosses the Ray handle between the HTTP ingress and the model replica, typed both ways.

    ingress ── GenerationRequest ──► replica          (built once from the validated OpenAI body)
    ingress ◄── Started, Generated…, Finished ──      (or Failed, at any point)

No Ray, no torch, no web framework: the Serve app (chameleon.serving.app) and the local path
(chameleon.serving.local) send the same `GenerationRequest` to `ModelServer.events`
(chameleon.serving.replica) and read the same events back (`answers.Answer` turns them into
response bodies). Every type is a frozen dataclass, pickled by Ray as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from chameleon.serving.protocol import ApiError, ChatRequest, PersonalizationDetail, RequestBody
from chameleon.serving.sampling import SamplingParams


@dataclass(frozen=True)
class ChatTurn:
    role: str
    """`system`, `user` or `assistant` (`developer` arrives as `system`)."""
    content: str

    def as_template_message(self) -> dict[str, str]:
        """The message as chat templates read it."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request for the model replica: the prompt, its `SamplingParams`, and who
    asks for which edit."""

    kind: Literal["chat", "completion"]
    params: SamplingParams
    messages: tuple[ChatTurn, ...] = ()
    """Chat requests: the conversation, rendered by the model's chat template."""
    prompt: str = ""
    """Text completions: the prompt."""
    chat_template_kwargs: Mapping[str, Any] | None = None
    """Only the allow-listed, value-checked switches (protocol.TEMPLATE_KWARGS)."""
    stream: bool = False
    user: str | None = None
    """Selects the user's group (the run's assignments)."""
    group_id: str | None = None
    """A group named in the request (`personalization.group_id` or `model: <name>:<group>`)."""
    personalization_off: bool = False
    """The base model's answer: no edit at all."""
    return_token_ids: bool = False

    @classmethod
    def from_body(cls, body: RequestBody) -> GenerationRequest:
        """The request a validated body (`protocol.parse_request`) asks for (ApiError 400 for
        content or settings the body's own checks refuse)."""
        p = body.personalization
        common: dict[str, Any] = {
            "params": body.sampling_params(),
            "stream": body.stream,
            "user": body.user,
            "group_id": p.group_id if p else None,
            "personalization_off": bool(p and p.off),
            "return_token_ids": body.return_token_ids,
        }
        if isinstance(body, ChatRequest):
            turns = tuple(ChatTurn(m["role"], m["content"]) for m in body.plain_messages())
            return cls("chat", messages=turns, chat_template_kwargs=body.template_kwargs(), **common)
        return cls("completion", prompt=body.prompt_text(), **common)

    @property
    def prompt_param(self) -> str:
        """The body field a prompt problem is reported on."""
        return "messages" if self.kind == "chat" else "prompt"

    def prompt_chars(self) -> int:
        if self.kind == "chat":
            return sum(len(t.content) + len(t.role) for t in self.messages)
        return len(self.prompt)


# -- the replica's events ------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The request was admitted: which edit answers it, and its token counts."""

    personalization: PersonalizationDetail
    """As resolved (the ingress shows callers `access.public_personalization` of it)."""
    prompt_tokens: int
    max_tokens: int
    system_fingerprint: str


@dataclass(frozen=True)
class Generated:
    """New text (a stream's step, or a whole answer's text at once)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    stop_reason: str | int | None
    """The stop string or stop token id that ended the answer (None: end-of-sequence, length)."""
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """An error answer (`ApiError` itself does not cross the handle: exceptions pickle poorly)."""

    status: int
    message: str
    code: str | None
    param: str | None
    type: str

    @classmethod
    def of(cls, exc: ApiError) -> Failed:
        return cls(exc.status, exc.message, exc.code, exc.param, exc.type)

    def error(self) -> ApiError:
        return ApiError(self.status, self.message, self.code, param=self.param, type=self.type)


ReplicaEvent = Started | Generated | Finished | Failed
"""What `ModelServer.events` yields: `Started` (or `Failed`), `Generated`…, then `Finished` (or `Failed`)."""
