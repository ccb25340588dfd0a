"""The Ray Serve endpoint: published group edits behind an OpenAI-compatible API.

Two deployments, one concern each:

    HTTP ─► ChameleonIngress (FastAPI)          auth, request size, validation, OpenAI shapes, SSE
               │  handle.options(stream=True).generate.remote(payload)
               ▼
            ChameleonServer (model replica)     tokenizer limits, run + group resolution, EditCache,
                                                @serve.batch: one batched decode for every group

`ChameleonServer` holds the base model and, per bank layout, an `EditBank` on the model's device
with an `EditCache` (chameleon.edit_cache) deciding which (run, group) edits occupy its rows. A
request is *admitted* once: its run and group are resolved against the run being served at that
moment and its bank row is pinned, so a switch of `latest` never mixes runs inside one request and
never evicts a row a batch still reads. `@serve.batch` then gathers admitted requests; one manual
decode loop (KV cache, per-row temperature/top-p/seed/stop/max_tokens) runs them together, so
greedy and sampled requests of many groups share every forward pass and every edited layer applies
all rows' edits in one batched operation (`EditBank.bind`: the batch's rows are gathered once
per batch composition). Finished rows leave the batch (their KV cache is dropped).

Runs load from the store by id or through `latest` (polled every `refresh_interval_s` in a
background thread). A run made for another model (fingerprint mismatch) or with a file that fails
its checksum is refused, the previous run keeps serving, and `/healthz` says why.

`app_builder(args)` is the import path of the Serve config files (`cluster/serve-config.yaml`);
`build_app(ServeConfig, store=...)` is the same from Python (the store object may carry keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
import typing
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from chameleon.config import EMBEDDED_MODEL

if TYPE_CHECKING:  # heavy imports stay out of the ingress process
    from chameleon.edit import BoundEdits, Edit, EditBank
    from chameleon.edit_cache import EditCache, EditParams
    from chameleon.runs import PublishedRun
    from chameleon.storage import Store

log = logging.getLogger("chameleon.serving")

_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
"""Run and group ids (they become key segments in the store): as `artifacts.validate_run_id`."""
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_USER_MAX_CHARS = 256
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 128


def valid_id(value: str) -> bool:
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value))


# ---------------------------------------------------------------------------------------------
# Configuration


class ServeConfig(BaseModel):
    """Settings of the serving application (the `args` of a Serve config's application)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    store: str
    """Where runs are published: `s3://bucket/prefix` or a local directory (the job's `--store`)."""
    s3_endpoint: str | None = None
    """S3-compatible endpoint URL; default `CHAMELEON_S3_ENDPOINT`, else `AWS_ENDPOINT_URL`, else AWS.
    Credentials come from the usual AWS environment variables of the replicas."""
    run: str = "latest"
    """Run id to serve, or `latest` to follow the store's `latest` pointer without restarts."""
    model: str = EMBEDDED_MODEL
    """Base model (Hugging Face id or local path); must be the model the run was computed on
    (its fingerprint is checked against each run's manifest)."""
    revision: str | None = None
    """Hub revision of `model`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; `auto` is float32 on CPU and bfloat16 on GPU."""
    device: str = "auto"
    """`auto` (cuda when the replica has a GPU), `cpu`, `cuda`, `cuda:N`."""
    served_model_name: str | None = None
    """The `model` clients send and `/v1/models` lists; default: the model's name."""
    api_key_env: str | None = "CHAMELEON_API_KEY"
    """Environment variable (read by the ingress replicas) holding the bearer token; when it is
    unset or empty, requests need no token."""
    max_batch_size: int = Field(32, ge=1, le=4096)
    """Requests decoded together in one `@serve.batch` call."""
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=60.0)
    """How long a batch waits to fill up before it starts."""
    edit_cache_size: int = Field(256, ge=1)
    """Group edits resident per replica (bank rows besides the identity); least recently used
    unpinned rows are reused."""
    max_prompt_tokens: int = Field(4096, ge=1)
    """Longer prompts are refused with 400."""
    max_tokens_limit: int = Field(1024, ge=1)
    """Largest `max_tokens` a request may ask for (400 above it)."""
    default_max_tokens: int = Field(256, ge=1)
    """`max_tokens` of requests that give none (capped by `max_tokens_limit` and the context)."""
    max_request_bytes: int = Field(1 << 20, ge=1024)
    """Larger request bodies are refused with 413."""
    fallback: str = "base"
    """What users without an assignment get: `base` (no edit) or `group:<group_id>`."""
    refresh_interval_s: float = Field(30.0, gt=0.0)
    """How often a replica checks the store's `latest` pointer (and retries a run that failed to load)."""
    admission_timeout_s: float = Field(60.0, gt=0.0)
    """How long a request may wait for a free edit row before it gets 503."""
    num_replicas: int = Field(1, ge=1)
    """Model replicas (`ChameleonServer`); a Serve config's `deployments:` entry overrides it."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per model replica (0 on CPU; 1 on a GPU node)."""
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs per model replica; on CPU also the number of torch threads."""
    max_ongoing_requests: int = Field(256, ge=1)
    """Concurrent requests per replica (ingress and model); keep it above `max_batch_size`."""

    @field_validator("run")
    @classmethod
    def _run(cls, v: str) -> str:
        if v != "latest" and not valid_id(v):
            raise ValueError(f"run must be 'latest' or a run id (letters, digits, '-', '_', '.'), got {v!r}")
        return v

    @field_validator("fallback")
    @classmethod
    def _fallback(cls, v: str) -> str:
        if v == "base":
            return v
        kind, _, gid = v.partition(":")
        if kind != "group" or not valid_id(gid):
            raise ValueError(f"fallback must be 'base' or 'group:<group_id>', got {v!r}")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and v != "" and not _ENV_RE.fullmatch(v):
            raise ValueError(f"api_key_env must be an environment variable name, got {v!r}")
        return v or None

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

    @property
    def fallback_group(self) -> str | None:
        return self.fallback.partition(":")[2] if self.fallback.startswith("group:") else None

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model == EMBEDDED_MODEL:
            return EMBEDDED_MODEL.partition(":")[2]
        path = Path(self.model)
        return path.name if path.is_absolute() or self.model.startswith(".") else self.model


# ---------------------------------------------------------------------------------------------
# Errors (OpenAI shape) and request bodies


class ApiError(Exception):
    """A request that gets a 4xx/5xx with body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 (OpenAI's field name)
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_event(self) -> dict[str, Any]:
        return {"type": "error", "status": self.status, **self.body()}

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> ApiError:
        e = event["error"]
        return cls(event["status"], e["message"], e.get("code"), param=e.get("param"), type=e.get("type"))

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _error_type(status: int) -> str:
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


_UNSUPPORTED = {  # would change the answer: refused rather than ignored
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: bool(v),
    "suffix": lambda v: v not in (None, ""),
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none"),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}


class _Body(BaseModel):
    """Fields shared by chat and text completions. Unknown fields are ignored (clients send
    many); fields that would change the answer and are not supported are refused in `check`."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    personalization: Personalization | None = None
    return_token_ids: bool = False
    """Extension (as in vLLM): add the generated token ids to the choice."""
    ignore_eos: bool = False
    """Extension (as in vLLM): keep generating past the end-of-sequence token (benchmarks)."""

    def check(self) -> None:
        extra = self.model_extra or {}
        for name, unsupported in _UNSUPPORTED.items():
            if name in extra and unsupported(extra[name]):
                raise ApiError(400, f"parameter {name!r} is not supported by this server", "unsupported_parameter",
                               param=name)
        if self.n != 1:
            raise ApiError(400, f"n={self.n} is not supported: this server returns one choice (n=1)", "unsupported_parameter",
                           param="n")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ApiError(400, "seed must fit in a signed 64-bit integer", "invalid_value", param="seed")
        if self.user is not None and (
            not self.user or len(self.user) > _USER_MAX_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in self.user)
        ):
            raise ApiError(400, f"user must be 1-{_USER_MAX_CHARS} printable characters", "invalid_value", param="user")
        p = self.personalization
        if p is not None and p.group_id is not None and not valid_id(p.group_id):
            raise ApiError(
                400,
                f"invalid group id {p.group_id[:140]!r}: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'",
                "invalid_value",
                param="personalization.group_id",
            )

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", "invalid_value", param="stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"stop sequences must be 1-{MAX_STOP_CHARS} characters", "invalid_value", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise ApiError(400, f"messages[{i}]: only text content parts are supported (got {part.type!r})",
                                       "unsupported_content", param=f"messages[{i}].content")
                    texts.append(part.text)
                content = "".join(texts)
            elif m.content is None:
                raise ApiError(400, f"messages[{i}] has no content", "invalid_value", param=f"messages[{i}].content")
            else:
                content = m.content
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out


class CompletionRequest(_Body):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "exactly one prompt per request is supported", "unsupported_parameter", param="prompt")
        return self.prompt[0]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request body: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# The decode loop (no Ray): many requests, one forward per step, per-row sampling and edits


@dataclass
class GenItem:
    """One sequence to generate."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    row: int = 0
    """Bank row (0 = no edit)."""
    ignore_eos: bool = False


@dataclass
class Delta:
    """What one step produced for one sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Seq:
    item: GenItem
    ids: list[int] = field(default_factory=list)  # generated, without end-of-sequence
    n_generated: int = 0
    sent: int = 0  # characters of text already emitted
    finish: str | None = None
    generator: Any = None


class BatchDecoder:
    """Greedy or sampled decoding of a batch of prompts with the KV cache, row by row.

    Prompts are left padded; positions follow the attention mask as in `generate()`, and a batch
    without padding runs without a mask, so a request alone gives the same tokens as
    `model.generate` (and `chameleon.generation.generate`) on that prompt. With a bank, batch row
    i is edited by bank row `items[i].row` (row 0 rows are bit-exact base). Each `step()` returns
    one `Delta` (or None) per item; finished sequences leave the batch at the next step.
    """

    def __init__(self, model, tok, items: Sequence[GenItem], bank: EditBank | None = None,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        import torch  # noqa: PLC0415

        from chameleon.model import model_device  # noqa: PLC0415

        if not items:
            raise ValueError("nothing to decode")
        self.model, self.tok, self.bank = model, tok, bank
        self.device = model_device(model)
        self.seqs = [_Seq(item) for item in items]
        for s in self.seqs:
            if not s.item.prompt_ids:
                raise ValueError("empty prompt")
            if s.item.temperature > 0:
                seed = s.item.seed if s.item.seed is not None else secrets.randbits(63)
                s.generator = torch.Generator(device=self.device).manual_seed(seed % (2**63))
        self.eos = set(eos_token_ids if eos_token_ids is not None else default_eos_ids(model, tok))
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self._alive: list[int] = []
        self._cache = self._mask = self._pos = self._next = None
        self._edits: tuple[tuple[int, ...], BoundEdits] | None = None
        self._max_stop = max((len(s) for it in items for s in it.stop), default=0)
        self.forward_calls = 0

    @property
    def done(self) -> bool:
        return all(s.finish is not None for s in self.seqs)

    def cancel(self, i: int) -> None:
        """Stop sequence i (the client went away); it leaves the batch at the next step."""
        if self.seqs[i].finish is None:
            self.seqs[i].finish = "cancelled"

    def prefill(self) -> list[Delta | None]:
        import torch  # noqa: PLC0415

        with torch.inference_mode():
            lens = [len(s.item.prompt_ids) for s in self.seqs]
            B, L = len(lens), max(lens)
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.eos), 0)
            ids = torch.full((B, L), pad, dtype=torch.long)
            mask = torch.zeros((B, L), dtype=torch.long)
            for b, s in enumerate(self.seqs):
                n = lens[b]
                ids[b, L - n:] = torch.tensor(s.item.prompt_ids, dtype=torch.long)
                mask[b, L - n:] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            if min(lens) == L:
                # No padding: no mask at all, as `generate()` does (same attention path, same numbers).
                pos = torch.arange(L, device=self.device).expand(B, L)
                self._mask = None
            else:
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
                self._mask = mask
            self._alive = list(range(B))
            logits = self._forward(ids, pos)
            self._pos = pos[:, -1]
            return self._advance(logits)

    def step(self) -> list[Delta | None]:
        import torch  # noqa: PLC0415

        with torch.inference_mode():
            self._prune()
            if not self._alive:
                return [None] * len(self.seqs)
            B = len(self._alive)
            if self._mask is not None:
                self._mask = torch.cat([self._mask, self._mask.new_ones((B, 1))], dim=1)
            self._pos = self._pos + 1
            logits = self._forward(self._next[:, None], self._pos[:, None])
            return self._advance(logits)

    def run(self) -> list[tuple[str, list[int], str]]:
        """Decode to the end; (text, token ids, finish reason) per item."""
        texts = [""] * len(self.seqs)
        ids: list[list[int]] = [[] for _ in self.seqs]
        events = self.prefill()
        while True:
            for i, ev in enumerate(events):
                if ev is not None:
                    texts[i] += ev.text
                    ids[i] += ev.token_ids
            if self.done:
                break
            events = self.step()
        return [(texts[i], ids[i], self.seqs[i].finish or "length") for i in range(len(self.seqs))]

    # -- internals ---------------------------------------------------------------------------

    def _rows(self) -> list[int]:
        return [self.seqs[i].item.row for i in self._alive]

    def _forward(self, input_ids, position_ids):
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": self._mask,
            "position_ids": position_ids,
            "use_cache": True,
        }
        if self._cache is not None:
            kwargs[self._cache_kw] = self._cache
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        rows = self._rows()
        self.forward_calls += 1
        if self.bank is not None and any(rows):
            key = tuple(rows)
            if self._edits is None or self._edits[0] != key:  # a new composition (rows left the batch)
                self._edits = (key, self.bank.bind(rows))
            with self._edits[1].apply(self.model):
                out = self.model(**kwargs)
        else:
            out = self.model(**kwargs)
        self._cache = getattr(out, self._cache_kw, None)
        if self._cache is None:
            self._cache = out.past_key_values
        return out.logits[:, -1].float()

    def _select(self, logits):
        import torch  # noqa: PLC0415

        next_tokens = torch.argmax(logits, dim=-1)
        for j, i in enumerate(self._alive):
            item = self.seqs[i].item
            if item.temperature <= 0:
                continue
            probs = torch.softmax(logits[j] / item.temperature, dim=-1)
            if item.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) > item.top_p  # keeps at least one
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            next_tokens[j] = torch.multinomial(probs, 1, generator=self.seqs[i].generator)[0]
        return next_tokens

    def _advance(self, logits) -> list[Delta | None]:
        self._next = self._select(logits)
        tokens = self._next.tolist()
        events: list[Delta | None] = [None] * len(self.seqs)
        for j, i in enumerate(self._alive):
            s = self.seqs[i]
            if s.finish is None:
                events[i] = self._append(s, tokens[j])
        return events

    def _append(self, s: _Seq, token: int) -> Delta:
        s.n_generated += 1
        is_eos = token in self.eos and not s.item.ignore_eos
        if not is_eos:
            s.ids.append(token)
        finish = "stop" if is_eos else ("length" if s.n_generated >= s.item.max_tokens else None)
        text = self.tok.decode(s.ids, skip_special_tokens=True)
        end = len(text)
        if s.item.stop:
            start = max(0, s.sent - self._max_stop)
            hits = [k for k in (text.find(st, start) for st in s.item.stop) if k >= 0]
            if hits:
                end, finish = min(hits), "stop"
        if finish is None:
            # Hold back an incomplete UTF-8 character and a tail that may begin a stop sequence.
            while end > s.sent and text[end - 1] == "\ufffd":
                end -= 1
            hold = 0
            for st in s.item.stop:
                for k in range(min(len(st) - 1, end - s.sent), hold, -1):
                    if text[end - k:end] == st[:k]:
                        hold = k
                        break
            end -= hold
        delta = text[s.sent:end] if end > s.sent else ""
        s.sent = max(s.sent, end)
        s.finish = finish
        return Delta(delta, [token], finish)

    def _prune(self) -> None:
        import torch  # noqa: PLC0415

        keep = [j for j, i in enumerate(self._alive) if self.seqs[i].finish is None]
        if len(keep) == len(self._alive) or not keep:
            if not keep:
                self._alive = []
            return
        if not hasattr(self._cache, "batch_select_indices"):
            return  # this cache cannot drop rows: keep computing the finished ones (ignored)
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(idx)
        self._alive = [self._alive[j] for j in keep]
        self._next, self._pos = self._next[idx], self._pos[idx]
        if self._mask is not None:
            self._mask = self._mask[idx]


def default_eos_ids(model, tok) -> list[int]:
    """End-of-sequence ids as `generate()` uses them (the generation config), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


# ---------------------------------------------------------------------------------------------
# Runs: loading, checking, following `latest`


@dataclass(frozen=True)
class BankSpec:
    """Banks are shared by runs with the same layout (usually every run of one job config)."""

    layers: tuple[int, ...]
    site: str
    max_rank: int
    positions: str


@dataclass
class LoadedRun:
    run_id: str
    published: PublishedRun
    user_groups: dict[str, str]
    group_ids: frozenset[str]
    spec: BankSpec
    params: EditParams
    loaded_at: float
    warnings: list[str] = field(default_factory=list)


def load_run(store: Store, run_id: str, fingerprint, num_layers: int, fallback_group: str | None) -> LoadedRun:
    """Open a committed run for serving: model check, manifest sanity, assignments (checksummed)."""
    from chameleon.artifacts import ArtifactError, RunReader  # noqa: PLC0415
    from chameleon.edit_cache import EditParams  # noqa: PLC0415
    from chameleon.runs import PublishedRun  # noqa: PLC0415

    reader = RunReader(store, run_id)
    reader.check_model(fingerprint)
    m = reader.manifest
    try:
        hidden = int(m["hidden_size"])
        layers = tuple(sorted({int(x) for x in m["captured_layers"]}))
        site = str(m["site"])
        max_rank = int(m["max_rank"])
        edit = m["edit"]
        params = EditParams(float(edit["alpha"]), float(edit["beta"]), bool(edit["centered"]))
        positions = str(edit["positions"])
        group_ids = [str(g["group_id"]) for g in m["groups"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"run {run_id!r} has an incomplete manifest for serving: {exc!r}") from None
    if hidden != fingerprint.hidden_size:
        raise ArtifactError(f"run {run_id!r} has hidden size {hidden}, the model {fingerprint.hidden_size}")
    if not layers or not all(0 <= x < num_layers for x in layers):
        raise ArtifactError(f"run {run_id!r} captured layers {list(layers)} outside the model's {num_layers}")
    if site not in ("mlp", "residual") or positions not in ("last", "all") or max_rank < 1:
        raise ArtifactError(f"run {run_id!r}: unsupported edit site/positions/rank {site!r}/{positions!r}/{max_rank}")
    bad = [g for g in group_ids if not valid_id(g)]
    if bad:
        raise ArtifactError(f"run {run_id!r} lists invalid group ids {bad[:3]}")
    published = PublishedRun(reader)
    assignments = published.assignments()  # verified against the manifest's checksum
    user_groups = {str(u): str(row["group_id"]) for u, row in assignments.items()}
    run = LoadedRun(
        run_id=reader.run_id,
        published=published,
        user_groups=user_groups,
        group_ids=frozenset(group_ids),
        spec=BankSpec(layers, site, max_rank, positions),
        params=params,
        loaded_at=time.time(),
    )
    unknown = sorted({g for g in user_groups.values() if g not in run.group_ids})
    if unknown:
        run.warnings.append(f"assignments name groups the run does not publish: {unknown[:5]}")
    if fallback_group and fallback_group not in run.group_ids:
        run.warnings.append(
            f"fallback group {fallback_group!r} is not in run {run.run_id!r}: unknown users get the base model"
        )
    return run


class RunRegistry:
    """The run a replica serves; follows `latest` when asked to. Thread-safe.

    A run that cannot be served (another model, a checksum mismatch, a broken manifest) is
    refused once and remembered; the previous run keeps serving. Errors reaching the store are
    transient: the next refresh tries again.
    """

    def __init__(self, store: Store, run: str, fingerprint, num_layers: int, fallback_group: str | None) -> None:
        self.store = store
        self.requested = run
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.fallback_group = fallback_group
        self.current: LoadedRun | None = None
        self.target: str | None = None
        self.refused: dict[str, str] = {}
        self.last_error: str | None = None
        self.last_refresh: float | None = None
        self.artifact_errors: deque[tuple[float, str]] = deque(maxlen=20)
        self.switches = 0
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Check the pointer (or the pinned run) and load a new run; True when it switched."""
        from chameleon.artifacts import ArtifactError, RunNotFoundError, latest_run_id  # noqa: PLC0415

        with self._lock:
            self.last_refresh = time.time()
            try:
                target = latest_run_id(self.store) if self.requested == "latest" else self.requested
            except Exception as exc:  # storage unreachable, a malformed pointer, ...
                self.last_error = f"cannot read the latest pointer under {self.store.uri}: {exc}"
                return False
            if target is None:
                self.last_error = f"no committed run under {self.store.uri} (no 'latest' pointer yet)"
                return False
            self.target = target
            if self.current is not None and self.current.run_id == target:
                self.last_error = None
                return False
            if target in self.refused:
                return False
            try:
                run = load_run(self.store, target, self.fingerprint, self.num_layers, self.fallback_group)
            except RunNotFoundError as exc:
                self.last_error = str(exc)
                return False
            except (ArtifactError, ValueError) as exc:
                self.refused[target] = f"{type(exc).__name__}: {exc}"
                self.last_error = None
                log.error("refusing run %s: %s", target, exc)
                return False
            except Exception as exc:
                self.last_error = f"cannot load run {target!r}: {type(exc).__name__}: {exc}"
                return False
            self.current, self.last_error = run, None
            self.switches += 1
            log.info("serving run %s (%d groups, %d users)", run.run_id, len(run.group_ids), len(run.user_groups))
            return True

    def record_artifact_error(self, message: str) -> None:
        self.artifact_errors.append((time.time(), message))

    def status(self) -> dict[str, Any]:
        run = self.current
        recent = [msg for t, msg in self.artifact_errors if time.time() - t < 600]
        problems = []
        if self.target is not None and self.target in self.refused:
            problems.append(f"run {self.target!r} refused: {self.refused[self.target]}")
        if self.last_error:
            problems.append(self.last_error)
        problems += recent
        state = "unavailable" if run is None else ("degraded" if problems else "ok")
        return {
            "status": state,
            "requested_run": self.requested,
            "latest": self.target,
            "run_id": run.run_id if run else None,
            "run": None if run is None else {
                "run_id": run.run_id,
                "groups": len(run.group_ids),
                "users": len(run.user_groups),
                "layers": list(run.spec.layers),
                "site": run.spec.site,
                "loaded_at": run.loaded_at,
                "warnings": run.warnings,
            },
            "refused_runs": dict(self.refused),
            "last_error": self.last_error,
            "artifact_errors": recent,
            "problems": problems,
            "run_switches": self.switches,
            "last_refresh": self.last_refresh,
        }


# ---------------------------------------------------------------------------------------------
# The model replica, Ray-free part


@dataclass
class Resolution:
    run: LoadedRun | None
    group_id: str | None
    source: str
    """`user` (assignment), `group` (named in the request), `fallback`, or `off`."""
    user: str | None

    def describe(self) -> dict[str, Any]:
        return {
            "run_id": self.run.run_id if self.run else None,
            "group_id": self.group_id,
            "source": self.source,
            "user": self.user,
        }


@dataclass
class Admission:
    """A request that passed admission: prompt tokens, resolved edit, pinned bank row."""

    item: GenItem
    resolution: Resolution
    spec: BankSpec | None
    cache: EditCache | None
    stream: bool
    started: bool = False
    cancelled: bool = False
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.cache is not None and self.item.row:
                self.cache.release(self.item.row)


class ModelServer:
    """Model, tokenizer, runs, edit caches and batch planning of one replica (no Ray)."""

    def __init__(self, cfg: ServeConfig, store: Store | None = None) -> None:
        import torch  # noqa: PLC0415

        from chameleon.artifacts import fingerprint_model  # noqa: PLC0415
        from chameleon.config import ModelConfig  # noqa: PLC0415
        from chameleon.model import hidden_size, load_model, num_layers  # noqa: PLC0415
        from chameleon.storage import open_store  # noqa: PLC0415

        self.cfg = cfg
        self.store = store if store is not None else open_store(
            cfg.store, **({"endpoint_url": cfg.s3_endpoint} if cfg.s3_endpoint else {})
        )
        mcfg = ModelConfig(name_or_path=cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=cfg.device)
        t0 = time.perf_counter()
        self.model, self.tok = load_model(mcfg)
        self.load_seconds = time.perf_counter() - t0
        self.device = next(self.model.parameters()).device
        self.hidden_size = hidden_size(self.model)
        self.num_layers = num_layers(self.model)
        self.fingerprint = fingerprint_model(self.model, cfg.model)
        self.eos_ids = default_eos_ids(self.model, self.tok)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.torch_threads = torch.get_num_threads()
        self.registry = RunRegistry(self.store, cfg.run, self.fingerprint, self.num_layers, cfg.fallback_group)
        self._caches: dict[BankSpec, EditCache] = {}
        self.stats = {"batches": 0, "requests": 0, "max_batch": 0, "max_groups_in_batch": 0,
                      "last_batch": None, "generated_tokens": 0}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.registry.refresh()

    # -- background refresh ------------------------------------------------------------------

    def start_polling(self) -> None:
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="chameleon-run-refresh", daemon=True)
            self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.refresh_interval_s):
            if self.cfg.run != "latest" and self.registry.current is not None:
                continue  # a pinned run never changes
            try:
                self.registry.refresh()
            except Exception:  # never let the poller die
                log.exception("run refresh failed")

    # -- admission -----------------------------------------------------------------------------

    def render(self, payload: dict[str, Any]) -> list[int]:
        """Prompt token ids of a request, within the limits (ApiError 400 otherwise)."""
        if payload["kind"] == "chat":
            messages = payload["messages"]
            if getattr(self.tok, "chat_template", None):
                try:
                    text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                except Exception as exc:  # jinja raises for conversations the template rejects
                    raise ApiError(400, f"the model's chat template rejects these messages: {exc}",
                                   "invalid_messages", param="messages") from None
            else:
                text = "".join(f"{m['content']}\n" for m in messages)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tok(payload["prompt"], add_special_tokens=True)["input_ids"]
        n = len(ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty", "invalid_value", param="prompt")
        if n > self.cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {n} tokens; this server accepts at most {self.cfg.max_prompt_tokens}",
                           "context_length_exceeded", param="messages" if payload["kind"] == "chat" else "prompt")
        return list(ids)

    def max_tokens_for(self, payload: dict[str, Any], n_prompt: int) -> int:
        asked = payload.get("max_tokens")
        room = (self.max_context - n_prompt) if self.max_context else None
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt ({n_prompt} tokens) fills the model's context of {self.max_context}",
                           "context_length_exceeded")
        if asked is None:
            return max(1, min(self.cfg.default_max_tokens, room or self.cfg.default_max_tokens))
        if room is not None and asked > room:
            raise ApiError(400, f"prompt ({n_prompt} tokens) + max_tokens ({asked}) exceeds the model's context of "
                           f"{self.max_context} tokens", "context_length_exceeded", param="max_tokens")
        return int(asked)

    def resolve(self, payload: dict[str, Any]) -> Resolution:
        """Which run and group a request gets (decided once, at admission)."""
        pers = payload.get("personalization") or {}
        user = payload.get("user")
        run = self.registry.current
        if pers.get("off"):
            return Resolution(run, None, "off", user)
        if run is None:
            status = self.registry.status()
            why = "; ".join(status["problems"]) or "no run loaded"
            raise ApiError(503, f"no personalization run is being served ({why}); "
                           "send personalization.off=true for the base model", "no_run")
        gid = pers.get("group_id")
        if gid is not None:
            if gid not in run.group_ids:
                raise ApiError(404, f"group {gid!r} is not in run {run.run_id!r}", "group_not_found",
                               param="personalization.group_id")
            return Resolution(run, gid, "group", user)
        if user is not None and user in run.user_groups and run.user_groups[user] in run.group_ids:
            return Resolution(run, run.user_groups[user], "user", user)
        fb = self.cfg.fallback_group
        return Resolution(run, fb if fb in run.group_ids else None, "fallback", user)

    def cache_for(self, spec: BankSpec) -> EditCache:
        from chameleon.edit import EditBank  # noqa: PLC0415
        from chameleon.edit_cache import EditCache  # noqa: PLC0415

        cache = self._caches.get(spec)
        if cache is None:
            bank = EditBank(self.hidden_size, spec.layers, site=spec.site, max_rank=spec.max_rank,
                            positions=spec.positions, device=self.device)
            cache = self._caches[spec] = EditCache(bank, self.cfg.edit_cache_size)
        return cache

    def load_edit(self, run: LoadedRun, group_id: str) -> Edit:
        return run.published.group_edit(group_id)

    # -- batches -------------------------------------------------------------------------------

    def plan(self, admissions: Sequence[Admission]) -> list[tuple[BatchDecoder, list[int]]]:
        """One decoder per bank layout in the batch (normally one); base requests join the first."""
        groups: dict[BankSpec | None, list[int]] = {}
        for i, a in enumerate(admissions):
            groups.setdefault(a.spec if a.item.row else None, []).append(i)
        plain = groups.pop(None, [])
        plans = []
        for n, (spec, idxs) in enumerate(groups.items()):
            if n == 0:
                idxs = sorted(idxs + plain)
                plain = []
            bank = self._caches[spec].bank
            plans.append((BatchDecoder(self.model, self.tok, [admissions[i].item for i in idxs], bank, self.eos_ids), idxs))
        if plain:
            plans.append((BatchDecoder(self.model, self.tok, [admissions[i].item for i in plain], None, self.eos_ids), plain))
        groups_in_batch = {(a.resolution.run.run_id if a.resolution.run else None, a.resolution.group_id)
                           for a in admissions if a.item.row}
        s = self.stats
        s["batches"] += 1
        s["requests"] += len(admissions)
        s["max_batch"] = max(s["max_batch"], len(admissions))
        s["max_groups_in_batch"] = max(s["max_groups_in_batch"], len(groups_in_batch))
        s["last_batch"] = {"requests": len(admissions), "groups": len(groups_in_batch), "forwards": len(plans)}
        return plans

    def health(self) -> dict[str, Any]:
        status = self.registry.status()
        status.update({
            "model": self.cfg.model_name,
            "model_fingerprint": self.fingerprint.to_dict(),
            "device": str(self.device),
            "torch_threads": self.torch_threads,
            "edit_caches": [
                {"layers": list(spec.layers), "site": spec.site, **cache.stats().to_dict()}
                for spec, cache in self._caches.items()
            ],
            "batching": {**self.stats, "max_batch_size": self.cfg.max_batch_size,
                         "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s},
        })
        return status


# ---------------------------------------------------------------------------------------------
# Deployments


def _set_torch_threads(cfg: ServeConfig) -> None:
    """On CPU replicas, use as many torch threads as CPUs the replica holds."""
    import torch  # noqa: PLC0415

    cpus = cfg.num_cpus
    with contextlib.suppress(Exception):
        import ray  # noqa: PLC0415

        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", cpus))
    if cfg.device in ("auto", "cpu") and not torch.cuda.is_available() and cpus >= 1:
        torch.set_num_threads(max(1, math.floor(cpus)))


@serve.deployment(name="ChameleonServer", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class ChameleonServer:
    """The model replica: admission, the edit cache, batched decoding (streams events)."""

    def __init__(self, settings: dict[str, Any], store: Store | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.cfg = ServeConfig.model_validate(settings)
        _set_torch_threads(self.cfg)
        self.core = ModelServer(self.cfg, store)
        self._batch.set_max_batch_size(self.cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self.core.start_polling()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.core.stop_polling()

    async def health(self) -> dict[str, Any]:
        return self.core.health()

    async def refresh(self) -> dict[str, Any]:
        """Check the store now (tests and operators; the poller does it every refresh_interval_s)."""
        await asyncio.to_thread(self.core.registry.refresh)
        return self.core.health()

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events: one `start` (or `error`), then `delta`s, then `end`."""
        try:
            adm = await self._admit(payload)
        except ApiError as exc:
            yield exc.to_event()
            return
        except Exception as exc:
            log.exception("admission failed")
            yield ApiError(500, f"internal error during admission: {type(exc).__name__}", "internal_error").to_event()
            return
        yield {"type": "start", "personalization": adm.resolution.describe(), "prompt_tokens": len(adm.item.prompt_ids),
               "max_tokens": adm.item.max_tokens}
        texts: list[str] = []
        ids: list[int] = []
        n, finish = 0, None
        try:
            async for ev in self._batch(adm):
                if ev is None or finish is not None:
                    # After the end, keep draining: the batch then closes this request's stream
                    # itself (breaking out would leave an orphaned future in @serve.batch).
                    continue
                n += len(ev.token_ids)
                if adm.stream:
                    if ev.text or payload.get("return_token_ids"):
                        yield {"type": "delta", "text": ev.text, "token_ids": ev.token_ids}
                else:
                    texts.append(ev.text)
                    ids += ev.token_ids
                if ev.finish_reason:
                    finish = ev.finish_reason
                    if not adm.stream:
                        yield {"type": "delta", "text": "".join(texts), "token_ids": ids}
                    yield {"type": "end", "finish_reason": finish, "completion_tokens": n}
            if finish is None:
                raise RuntimeError("the batch ended before this request finished")
        except Exception as exc:
            log.exception("generation failed")
            yield ApiError(500, f"internal error during generation: {type(exc).__name__}: {exc}", "internal_error").to_event()
        finally:
            if not adm.started:
                adm.release()  # never reached a batch (cancelled while queued)
            elif finish is None:
                adm.cancelled = True  # the batch drops it at its next step, then releases the row

    async def _admit(self, payload: dict[str, Any]) -> Admission:
        core = self.core
        prompt_ids = core.render(payload)
        max_tokens = core.max_tokens_for(payload, len(prompt_ids))
        res = core.resolve(payload)
        row, cache, spec = 0, None, None
        if res.group_id is not None:
            spec = res.run.spec
            cache = core.cache_for(spec)
            row = await self._acquire(cache, res.run, res.group_id)
        item = GenItem(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=float(payload.get("temperature", 1.0)),
            top_p=float(payload.get("top_p", 1.0)),
            seed=payload.get("seed"),
            stop=tuple(payload.get("stop") or ()),
            row=row,
            ignore_eos=bool(payload.get("ignore_eos")),
        )
        return Admission(item, res, spec, cache, stream=bool(payload.get("stream")))

    async def _acquire(self, cache: EditCache, run: LoadedRun, group_id: str) -> int:
        from chameleon.edit_cache import CacheFullError  # noqa: PLC0415

        key = (run.run_id, group_id)
        row = cache.acquire(key)
        if row is not None:
            return row
        edit = await self._load(run, group_id)
        deadline = time.monotonic() + self.cfg.admission_timeout_s
        while True:
            try:
                # Pins the key's row if another request installed it meanwhile.
                return cache.install(key, edit, run.params)
            except CacheFullError as exc:
                # Every row is held by admitted requests: wait for a batch to finish.
                if time.monotonic() > deadline:
                    raise ApiError(503, str(exc), "edit_slots_busy") from None
                await asyncio.sleep(0.005)
            except ValueError as exc:
                msg = f"group {group_id!r} of run {run.run_id!r} does not fit the edit bank: {exc}"
                self.core.registry.record_artifact_error(msg)
                raise ApiError(503, msg, "artifact_error") from None

    async def _load(self, run: LoadedRun, group_id: str) -> Edit:
        from chameleon.artifacts import ArtifactError  # noqa: PLC0415
        from chameleon.storage import StoreError  # noqa: PLC0415

        key = (run.run_id, group_id)
        fut = self._loading.get(key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self.core.load_edit, run, group_id))
            self._loading[key] = fut
            fut.add_done_callback(lambda _f: self._loading.pop(key, None))
        try:
            return await asyncio.shield(fut)
        except ArtifactError as exc:
            msg = f"refused the edit of group {group_id!r} of run {run.run_id!r}: {type(exc).__name__}: {exc}"
            self.core.registry.record_artifact_error(msg)
            raise ApiError(503, msg, "artifact_error") from None
        except (KeyError, ValueError) as exc:
            msg = f"cannot read the edit of group {group_id!r} of run {run.run_id!r}: {exc}"
            self.core.registry.record_artifact_error(msg)
            raise ApiError(503, msg, "artifact_error") from None
        except StoreError as exc:
            raise ApiError(503, f"cannot read the artifact store: {exc}", "store_unavailable") from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _batch(self, admissions: list[Admission]) -> AsyncIterator[list[Any]]:
        """One call per batch: yields, per decode step, one event per request (StopIteration when done)."""
        n = len(admissions)
        for a in admissions:
            a.started = True
        done = [a.released for a in admissions]  # released = cancelled before the batch began
        try:
            live = [i for i in range(n) if not done[i]]
            plans = [(dec, [live[k] for k in idxs]) for dec, idxs in self.core.plan([admissions[i] for i in live])] if live else []

            def run_all(first: bool) -> list[Any]:
                out: list[Any] = [None] * n
                for dec, idxs in plans:
                    if dec.done:
                        continue
                    for k, i in enumerate(idxs):
                        if admissions[i].cancelled:
                            dec.cancel(k)
                    events = dec.prefill() if first else dec.step()
                    for k, i in enumerate(idxs):
                        out[i] = events[k]
                return out

            first = True
            while plans and not all(dec.done for dec, _ in plans):
                events = await asyncio.to_thread(run_all, first)
                first = False
                results: list[Any] = []
                for i in range(n):
                    if done[i]:
                        results.append(StopIteration)
                        continue
                    ev = events[i]
                    if ev is not None:
                        self.core.stats["generated_tokens"] += len(ev.token_ids)
                        if ev.finish_reason:
                            done[i] = True
                    results.append(ev)
                yield results
        finally:
            for a in admissions:
                a.release()


api = FastAPI(title="Chameleon (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)


def _hints(fn):
    """Resolve a route's string annotations (this module uses postponed evaluation) before Serve
    rewrites its signature; otherwise FastAPI would read `request: "Request"` as a query field."""
    fn.__annotations__ = typing.get_type_hints(fn)
    return fn


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return exc.response(headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return ApiError(exc.status_code, message, "not_found" if exc.status_code == 404 else "http_error").response()


def _usage(start: dict[str, Any], end: dict[str, Any]) -> dict[str, int]:
    p, c = int(start["prompt_tokens"]), int(end["completion_tokens"])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse_line(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# Helpers the ingress uses are defined above it: `serve.ingress` serializes the class when it is
# decorated, so names defined later in this module would be missing in the replica.


@serve.deployment(name="ChameleonIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ChameleonIngress:
    """HTTP: auth, size limits, validation, OpenAI response shapes and server-sent events."""

    def __init__(self, server, settings: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(settings)
        self.server = server
        self.streaming = server.options(stream=True)
        self.api_key = (os.environ.get(self.cfg.api_key_env) or None) if self.cfg.api_key_env else None

    # -- plumbing ----------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "invalid_api_key")

    async def _json(self, request: Request) -> Any:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", "request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"request body is not valid JSON: {str(exc)[:200]}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_json")
        return data

    def _parse(self, cls: type[_Body], data: dict[str, Any]) -> Any:
        try:
            req = cls.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, _validation_message(exc), "invalid_request_body") from None
        req.check()
        if req.model != self.cfg.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           "model_not_found", param="model")
        asked = req.requested_max_tokens()
        if asked is not None and asked > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens={asked} exceeds this server's limit of {self.cfg.max_tokens_limit}",
                           "max_tokens_too_large", param="max_tokens")
        return req

    def _payload(self, req: _Body, kind: str) -> dict[str, Any]:
        p = req.personalization
        payload = {
            "kind": kind,
            "max_tokens": req.requested_max_tokens(),
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": req.stops(),
            "seed": req.seed,
            "stream": req.stream,
            "user": req.user,
            "personalization": p.model_dump() if p else None,
            "return_token_ids": req.return_token_ids,
            "ignore_eos": req.ignore_eos,
        }
        if kind == "chat":
            payload["messages"] = req.plain_messages()
        else:
            payload["prompt"] = req.prompt_text()
        return payload

    async def _start(self, payload: dict[str, Any]):
        gen = self.streaming.generate.remote(payload)
        try:
            first = await gen.__anext__()
        except Exception as exc:
            log.exception("model replica failed")
            raise ApiError(503, f"the model replica is unavailable: {type(exc).__name__}", "replica_unavailable") from None
        if first.get("type") == "error":
            raise ApiError.from_event(first)
        return gen, first

    @staticmethod
    def _headers(pers: dict[str, Any]) -> dict[str, str]:
        return {"x-chameleon-run": pers["run_id"] or "none", "x-chameleon-group": pers["group_id"] or "none"}

    async def _complete(self, request: Request, cls: type[_Body], kind: str):
        self._auth(request)
        req = self._parse(cls, await self._json(request))
        payload = self._payload(req, kind)
        gen, start = await self._start(payload)
        pers = start["personalization"]
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        headers = self._headers(pers)
        if req.stream:
            return StreamingResponse(
                self._sse(gen, start, req, kind, rid, created), media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        text, ids, end = "", [], None
        async for ev in gen:
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
        usage = _usage(start, end)
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": end["finish_reason"], "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": end["finish_reason"], "logprobs": None}
            obj = "text_completion"
        if req.return_token_ids:
            choice["token_ids"] = ids
        body = {"id": rid, "object": obj, "created": created, "model": self.cfg.model_name, "choices": [choice],
                "usage": usage, "personalization": pers}
        return JSONResponse(body, headers=headers)

    async def _sse(self, gen, start, req: _Body, kind: str, rid: str, created: int) -> AsyncIterator[str]:
        pers = start["personalization"]
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": self.cfg.model_name}

        def chunk(text: str | None, finish: str | None, ids: list[int] | None = None, first: bool = False) -> str:
            if kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
                    {"content": text} if text else {})
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            if ids is not None and req.return_token_ids:
                choice["token_ids"] = ids
            return _sse_line({**base, "choices": [choice], "personalization": pers})

        finished = False
        try:
            if kind == "chat":
                yield chunk("", None, first=True)
            async for ev in gen:
                if ev["type"] == "delta":
                    yield chunk(ev["text"], None, ev["token_ids"])
                elif ev["type"] == "end":
                    yield chunk(None, ev["finish_reason"], [])
                    if req.include_usage():
                        yield _sse_line({**base, "choices": [], "usage": _usage(start, ev), "personalization": pers})
                    break
                elif ev["type"] == "error":
                    yield _sse_line(ApiError.from_event(ev).body())
            finished = True
        except Exception as exc:
            log.exception("stream failed")
            yield _sse_line(ApiError(500, f"stream failed: {type(exc).__name__}", "internal_error").body())
            finished = True
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    gen.cancel()  # the client went away: stop the request on the replica
        yield "data: [DONE]\n\n"

    # -- routes --------------------------------------------------------------------------------

    @api.get("/healthz")
    @_hints
    async def healthz(self) -> JSONResponse:
        try:
            status = await self.server.health.remote()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "problems": [f"model replica: {type(exc).__name__}: {exc}"]},
                                status_code=503)
        status["auth"] = self.api_key is not None
        return JSONResponse(status, status_code=503 if status["status"] == "unavailable" else 200)

    @api.get("/v1/models")
    @_hints
    async def models(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "chameleon",
             "root": self.cfg.model},
        ]})

    @api.post("/v1/chat/completions")
    @_hints
    async def chat_completions(self, request: Request):
        return await self._complete(request, ChatRequest, "chat")

    @api.post("/v1/completions")
    @_hints
    async def completions(self, request: Request):
        return await self._complete(request, CompletionRequest, "completion")


# ---------------------------------------------------------------------------------------------
# Building the application


def build_app(cfg: ServeConfig, store: Store | None = None):
    """The Serve application: `ChameleonIngress` (HTTP) in front of `ChameleonServer` (model).

    `store` overrides `cfg.store` with a ready store object (e.g. an `S3Store` carrying keys);
    otherwise each replica opens `cfg.store` with the AWS credentials of its environment.
    """
    settings = cfg.model_dump()
    server = ChameleonServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(settings, store)
    return ChameleonIngress.options(max_ongoing_requests=cfg.max_ongoing_requests).bind(server, settings)


def app_builder(args: dict[str, Any]):
    """Import path of the Serve config files: `chameleon.serving:app_builder` with `args` =
    `ServeConfig` fields (`store`, `run`, `model`, `api_key_env`, ...)."""
    return build_app(ServeConfig.model_validate(dict(args or {})))


def run_server(
    cfg: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ray_num_cpus: int | None = None,
    app_name: str = "chameleon",
    detach: bool = False,
) -> int:
    """Start Ray (or join `address` / RAY_ADDRESS), deploy the app, and serve until Ctrl-C or
    SIGTERM (or return at once with `detach` on a running cluster)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray  # noqa: PLC0415
    from ray import serve  # noqa: PLC0415

    address = address or os.environ.get("RAY_ADDRESS")
    if detach and not address:
        raise ValueError("--detach needs a running cluster (--address or RAY_ADDRESS): a local Ray ends with this process")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=ray_num_cpus)
    started = time.perf_counter()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name=app_name, route_prefix="/")
        url = f"http://{host}:{port}"
        auth = f"bearer token from ${cfg.api_key_env}" if cfg.api_key_env and os.environ.get(cfg.api_key_env) else "no auth"
        print(
            f"serving {cfg.model_name!r} with run {cfg.run!r} of {cfg.store} at {url}/v1 ({auth}); "
            f"health: {url}/healthz; ready in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        if detach:
            return 0
        print("Ctrl-C to stop", flush=True)
        # SIGTERM (Kubernetes, `kill`) cleans up like Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        if not detach:
            if address:
                serve.delete(app_name)
            else:
                serve.shutdown()
            ray.shutdown()
