"""Admission: a request's prompt tokens within the limits, and its sampling made concrete (no Ray).

`PromptLimits` refuses prompts too long to tokenize (`max_prompt_chars`, before any work),
renders and tokenizes the prompt (the model's chat template for chat requests), and refuses what
does not fit (`max_prompt_tokens`, the model's context with the requested `max_tokens`): each a
400 that says why. `resolve_sampling` fills what the request left unset from the model's
generation config and the server's `default_max_tokens`. An `Admission` is the admitted request:
its `GenItem` for the engine, the edit resolved for it and its pinned bank row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chameleon.serving.config import ServeConfig
from chameleon.serving.decoder import GenItem
from chameleon.serving.edit_loader import PinnedEdit, Resolution
from chameleon.serving.protocol import ApiError
from chameleon.serving.replica_api import GenerationRequest
from chameleon.serving.sampling import SamplingParams


class PromptLimits:
    """The tokenizer and the limits a prompt must fit (one replica's)."""

    def __init__(self, cfg: ServeConfig, tok, max_context: int | None) -> None:
        self.cfg = cfg
        self.tok = tok
        self.max_context = max_context
        """The model's context in tokens (None: unknown, not limited)."""

    def check_chars(self, request: GenerationRequest) -> None:
        """Refuse prompts too long to be worth tokenizing (cheap, on the event loop)."""
        n = request.prompt_chars()
        limit = self.cfg.prompt_char_limit
        if n > limit:
            raise ApiError(
                400,
                f"the prompt has {n} characters; this server accepts at most {limit}",
                "context_length_exceeded",
                param=request.prompt_param,
            )

    def token_ids(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids of a request, within the limits (ApiError 400 otherwise)."""
        if request.kind == "chat":
            messages = [t.as_template_message() for t in request.messages]
            if getattr(self.tok, "chat_template", None):
                try:
                    # Only the allow-listed, value-checked kwargs (protocol.TEMPLATE_KWARGS) get here.
                    kwargs = {"add_generation_prompt": True, **(request.chat_template_kwargs or {})}
                    text = self.tok.apply_chat_template(messages, tokenize=False, **kwargs)
                except Exception as exc:  # jinja raises for conversations the template rejects
                    raise ApiError(
                        400,
                        f"the model's chat template rejects these messages: {str(exc)[:200]}",
                        "invalid_messages",
                        param="messages",
                    ) from None
            else:
                text = "".join(f"{m['content']}\n" for m in messages)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tok(request.prompt, add_special_tokens=True)["input_ids"]
        n = len(ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty", "invalid_value", param="prompt")
        if n > self.cfg.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {n} tokens; this server accepts at most {self.cfg.max_prompt_tokens}",
                "context_length_exceeded",
                param=request.prompt_param,
            )
        return list(ids)

    def max_tokens(self, asked: int | None, n_prompt: int) -> int:
        """The tokens a request may generate: what it asked, within the model's context, or the
        server's default (ApiError 400 when the prompt leaves no room for what it asked)."""
        room = (self.max_context - n_prompt) if self.max_context else None
        if room is not None and room < 1:
            raise ApiError(
                400,
                f"the prompt ({n_prompt} tokens) fills the model's context of {self.max_context}",
                "context_length_exceeded",
            )
        if asked is None:
            return max(1, min(self.cfg.default_max_tokens, room or self.cfg.default_max_tokens))
        if room is not None and asked > room:
            raise ApiError(
                400,
                f"prompt ({n_prompt} tokens) + max_tokens ({asked}) exceeds the model's context of "
                f"{self.max_context} tokens",
                "context_length_exceeded",
                param="max_tokens",
            )
        return int(asked)

    def resolve_sampling(
        self, params: SamplingParams, n_prompt: int, model_defaults: dict[str, Any]
    ) -> SamplingParams:
        """`params` made concrete for a prompt of `n_prompt` tokens (`SamplingParams.resolved`)."""
        return params.resolved(model_defaults, self.max_tokens(params.max_tokens, n_prompt))


@dataclass
class Admission:
    """A request that passed admission: its engine item, its resolved edit, its pinned bank row."""

    item: GenItem
    resolution: Resolution
    edit: PinnedEdit | None
    """None: no edit (the base model)."""
    stream: bool
    admitted_at: float = 0.0
    """`time.perf_counter()` when admission finished."""

    @property
    def bank(self):
        """The bank the engine reads the row's edit from (None: no edit)."""
        return self.edit.cache.bank if self.edit is not None else None

    def log_record(
        self, request_id: str, completion_tokens: int, finish: str, first_at: float | None, latency: float
    ) -> dict[str, Any]:
        """The request's structured log line (one per finished request)."""
        res = self.resolution
        return {
            "event": "request",
            "request_id": request_id,
            "run_id": res.run.run_id if res.run else None,
            "group_id": res.group_id,
            "source": res.source,
            "prompt_tokens": len(self.item.prompt_ids),
            "completion_tokens": completion_tokens,
            "finish_reason": finish,
            "ttft_s": round(first_at - self.admitted_at, 4) if first_at else None,
            "latency_s": round(latency, 4),
        }

    @property
    def released(self) -> bool:
        return self.edit is None or self.edit.released

    def release(self) -> None:
        """Unpin the bank row (idempotent); every exit path of a request calls it."""
        if self.edit is not None:
            self.edit.release()
