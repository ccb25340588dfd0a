"""The decode loop of the model replica: many requests, one forward per step, per-row sampling
and edits. No Ray and no web framework: importable and testable with torch alone.

`BatchDecoder` runs a batch of prompts with the KV cache; each batch row may use its own bank row
of an `EditBank` (row 0 = no edit), temperature, top-p, seed, stop sequences and token budget.
Rows that finish leave the batch (their KV cache is dropped) while the others go on.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chameleon.core.edit import BoundEdits, EditBank
from chameleon.core.model import model_device


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
    `model.generate` (and `chameleon.core.generation.generate`) on that prompt. With a bank, batch row
    i is edited by bank row `items[i].row` (row 0 rows are bit-exact base). Each `step()` returns
    one `Delta` (or None) per item; finished sequences leave the batch at the next step.
    """

    def __init__(
        self,
        model,
        tok,
        items: Sequence[GenItem],
        bank: EditBank | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
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
        with torch.inference_mode():
            lens = [len(s.item.prompt_ids) for s in self.seqs]
            B, L = len(lens), max(lens)
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.eos), 0)
            ids = torch.full((B, L), pad, dtype=torch.long)
            mask = torch.zeros((B, L), dtype=torch.long)
            for b, s in enumerate(self.seqs):
                n = lens[b]
                ids[b, L - n :] = torch.tensor(s.item.prompt_ids, dtype=torch.long)
                mask[b, L - n :] = 1
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
                    if text[end - k : end] == st[:k]:
                        hold = k
                        break
            end -= hold
        delta = text[s.sent : end] if end > s.sent else ""
        s.sent = max(s.sent, end)
        s.finish = finish
        return Delta(delta, [token], finish)

    def _prune(self) -> None:
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
