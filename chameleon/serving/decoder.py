"""Per-sequence decoding rules of the serving engine (chameleon.serving.engine).

No Ray and no web framework: importable and testable with torch alone.

- `GenItem`: one sequence to generate: prompt ids, resolved `SamplingParams`, edit row.
- `TextStream`: incremental detokenization (prefix/read offsets, as vLLM's detokenizer and
  transformers' TextStreamer do: each new token decodes a short window, never the whole text),
  stop strings cut before they are streamed, incomplete UTF-8 characters held back.
- `pick_tokens`: per-row logits processing (min_tokens, repetition/frequency/presence penalties,
  temperature, top-k, top-p, min-p) and greedy or seeded sampling.
- `left_pad`, `run_forward`: the batched forward with the KV cache and the rows' edits.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chameleon.core.edit import BoundEdits
from chameleon.core.model import cache_argument
from chameleon.serving.sampling import SamplingParams


@dataclass
class GenItem:
    """One sequence to generate: its prompt, its resolved sampling settings and its edit row."""

    prompt_ids: list[int]
    params: SamplingParams
    """Resolved (`SamplingParams.resolved`): every setting concrete."""
    row: int = 0
    """Bank row (0 = no edit)."""

    def __post_init__(self) -> None:
        if not self.params.is_resolved:
            raise ValueError("a GenItem needs resolved sampling settings (SamplingParams.resolved)")


@dataclass
class Delta:
    """What one step produced for one sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the sequence (None for end-of-sequence/length)."""


class TextStream:
    """The text of one generated sequence, decoded incrementally and cut at stop strings."""

    def __init__(self, tok, stop: Sequence[str] = ()) -> None:
        self.tok = tok
        self.stop = tuple(stop)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # complete characters decoded so far
        self.sent = 0  # characters of `text` already emitted
        self._prefix = self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int | None, final: bool) -> tuple[str, str | None]:
        """Add a token (None: none, e.g. end-of-sequence); return (text to emit, stop string hit)."""
        if token is not None:
            self.ids.append(token)
        # Decode a short window: the tokens since the last emitted boundary, with a few before it
        # as context (a token's text can depend on its left neighbour).
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
        end, hit = len(self.text), None
        if self.stop:
            start = max(0, self.sent - self._max_stop)
            found = [(k, st) for st in self.stop if (k := self.text.find(st, start)) >= 0]
            if found:
                end, hit = min(found)
        if hit is None and not final:
            # Hold back a tail that may begin a stop string.
            hold = 0
            for st in self.stop:
                for k in range(min(len(st) - 1, end - self.sent), hold, -1):
                    if self.text[end - k : end] == st[:k]:
                        hold = k
                        break
            end -= hold
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, hit


@dataclass
class SeqState:
    """Decoding state of one sequence."""

    item: GenItem
    stream: TextStream
    eos: frozenset[int]
    n_generated: int = 0
    out_ids: list[int] = field(default_factory=list)  # every sampled token, for the penalties
    finish: str | None = None
    generator: Any = None

    @classmethod
    def new(cls, item: GenItem, tok, eos: Sequence[int], device) -> SeqState:
        if not item.prompt_ids:
            raise ValueError("empty prompt")
        p = item.params
        s = cls(item, TextStream(tok, p.stop), frozenset(eos))
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            s.generator = torch.Generator(device=device).manual_seed(seed % (2**63))
        return s

    def append(self, token: int) -> Delta:
        """Take a sampled token: the delta to emit (its finish reason set when the sequence ends)."""
        p = self.item.params
        self.n_generated += 1
        self.out_ids.append(token)
        is_eos = token in self.eos and not p.ignore_eos
        is_stop_id = token in p.stop_token_ids
        finish = (
            "stop" if (is_eos or is_stop_id) else ("length" if self.n_generated >= p.max_tokens else None)
        )
        stop_reason: str | int | None = token if is_stop_id and not is_eos else None
        text, hit = self.stream.push(None if finish == "stop" else token, final=finish is not None)
        if hit is not None:
            finish, stop_reason = "stop", hit
        self.finish = finish
        return Delta(text, [token], finish, stop_reason)


MIN_TEMPERATURE = 1e-2
"""Temperatures in (0, 1e-2) are raised to this (as vLLM does): below it, float32 logits divided by
the temperature overflow, and softmax of an overflowed row is NaN."""


class SamplingError(ValueError):
    """One row's logits cannot be sampled (undefined after its logits processors): that request
    alone fails, with this message; the batch goes on."""


def pick_tokens(logits: torch.Tensor, seqs: Sequence[SeqState]) -> tuple[torch.Tensor, dict[int, str]]:
    """Next token per row of logits [B, V] (float32), and the rows that cannot be sampled
    ({row index: reason}; their token is meaningless). Plain greedy rows take the argmax; the
    others get their logits processors and, with a temperature, a draw from their own generator.
    A row never fails the step: NaN or an empty distribution fails that row only."""
    out = torch.argmax(logits, dim=-1)
    failed: dict[int, str] = {}
    nan_rows = torch.isnan(logits).any(dim=-1).tolist()
    for j, s in enumerate(seqs):
        if nan_rows[j]:
            failed[j] = "the model produced undefined (NaN) logits for this request"
            continue
        if s.item.params.plain:
            continue
        try:
            out[j] = _sample_row(logits[j], s)
        except SamplingError as exc:
            failed[j] = str(exc)
        except Exception as exc:
            failed[j] = f"sampling failed for this request ({type(exc).__name__})"
    return out, failed


def _sample_row(logits: torch.Tensor, s: SeqState) -> torch.Tensor:
    p = s.item.params
    x = logits.clone()
    if p.min_tokens and s.n_generated < p.min_tokens:
        banned = [t for t in (*(() if p.ignore_eos else s.eos), *p.stop_token_ids) if t < x.shape[0]]
        if banned:
            x[banned] = -float("inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(s.item.prompt_ids) | set(s.out_ids)), device=x.device)
        v = x[seen]
        x[seen] = torch.where(v < 0, v * p.repetition_penalty, v / p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and s.out_ids:
        counts = torch.bincount(torch.tensor(s.out_ids, device=x.device), minlength=x.shape[0])
        counts = counts[: x.shape[0]].to(x.dtype)
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    if p.temperature <= 0:
        return torch.argmax(_defined(x))
    x = x / max(p.temperature, MIN_TEMPERATURE)
    if 0 < p.top_k < x.shape[0]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, -float("inf"))
    probs = torch.softmax(_defined(x), dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) > p.top_p  # keeps at least one
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    # Checked before the draw: on a GPU, NaN reaching the sampling kernel is a device-side assert
    # that takes the whole CUDA context (every request of the replica) down with it.
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        raise SamplingError("the sampling settings of this request leave no token to sample")
    return torch.multinomial(probs, 1, generator=s.generator)[0]


def _defined(x: torch.Tensor) -> torch.Tensor:
    """Logits safe for argmax/softmax: NaN fails the row, +inf becomes the largest finite value
    (softmax of two +inf is NaN), a row with every token excluded fails."""
    if bool(torch.isnan(x).any()):
        raise SamplingError("the sampling settings of this request make its logits undefined (NaN)")
    x = x.clamp(max=torch.finfo(x.dtype).max)
    if bool(torch.isneginf(x).all()):
        raise SamplingError("the sampling settings of this request exclude every token")
    return x


def forward_kwargs(model) -> tuple[str, bool]:
    """(name of the model's cache argument, whether it takes `logits_to_keep`)."""
    return cache_argument(model), "logits_to_keep" in inspect.signature(model.forward).parameters


def pad_id(tok, eos: Sequence[int]) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, ...]:
    """(input ids, attention mask, position ids) of left-padded prompts, positions as `generate()`."""
    lens = [len(p) for p in prompts]
    B, L = len(lens), max(lens)
    ids = torch.full((B, L), pad, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[b, L - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device), pos.to(device)


def run_forward(model, input_ids, position_ids, mask, cache, bound: BoundEdits | None, cache_kw, keep_logits):
    """One forward with the KV cache (and the batch's edits): (last-position logits [B, V] in
    float32, the updated cache)."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "use_cache": True,
    }
    if cache is not None:
        kwargs[cache_kw] = cache
    if keep_logits:
        kwargs["logits_to_keep"] = 1
    if bound is not None:
        with bound.apply(model):
            out = model(**kwargs)
    else:
        out = model(**kwargs)
    new_cache = getattr(out, cache_kw, None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[:, -1].float(), new_cache


def default_eos_ids(model, tok) -> list[int]:
    """End-of-sequence ids as `generate()` uses them (the generation config), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
