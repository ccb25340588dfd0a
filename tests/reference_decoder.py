"""A reference decoder, in the tests only: the parity oracle of the serving engine.

`ReferenceDecoder` decodes one fixed batch of prompts together until its longest row ends (the
former `engine: static` path), with the same per-sequence rules as the continuous engine
(`SeqState`, `pick_tokens`, `run_forward` of chameleon.serving.decoder). Alone it gives token for
token what `model.generate` gives; the engine must give what it gives, whoever shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chameleon.core.edit import BoundEdits, EditBank
from chameleon.core.model import model_device
from chameleon.serving.decoder import (
    Delta,
    GenItem,
    SeqState,
    default_eos_ids,
    forward_kwargs,
    left_pad,
    pad_id,
    pick_tokens,
    run_forward,
)
from chameleon.serving.sampling import SamplingParams


def gen_item(prompt_ids: Sequence[int], max_tokens: int, row: int = 0, **sampling) -> GenItem:
    """An engine item for tests and benchmarks: greedy unless `temperature` is given, the other
    sampling settings as named (`SamplingParams` fields), resolved as the replica resolves them."""
    params = SamplingParams(**{"temperature": 0.0, **sampling})
    return GenItem(list(prompt_ids), params.resolved({}, max_tokens), row)


class ReferenceDecoder:
    """Greedy or sampled decoding of one batch of prompts with the KV cache.

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
        eos = list(eos_token_ids if eos_token_ids is not None else default_eos_ids(model, tok))
        self.seqs = [SeqState.new(item, tok, eos, self.device) for item in items]
        self._cache_kw, self._keep_logits = forward_kwargs(model)
        self._alive: list[int] = []
        self._cache = self._mask = self._pos = self._next = None
        self._edits: tuple[tuple[int, ...], BoundEdits] | None = None
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
            prompts = [s.item.prompt_ids for s in self.seqs]
            ids, mask, pos = left_pad(prompts, pad_id(self.tok, self.seqs[0].eos), self.device)
            self._mask = mask if not bool(mask.all()) else None
            self._alive = list(range(len(prompts)))
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

    def _forward(self, input_ids, position_ids):
        rows = [self.seqs[i].item.row for i in self._alive]
        self.forward_calls += 1
        bound = None
        if self.bank is not None and any(rows):
            key = tuple(rows)
            if self._edits is None or self._edits[0] != key:  # a new composition (rows left the batch)
                self._edits = (key, self.bank.bind(rows))
            bound = self._edits[1]
        logits, self._cache = run_forward(
            self.model,
            input_ids,
            position_ids,
            self._mask,
            self._cache,
            bound,
            self._cache_kw,
            self._keep_logits,
        )
        return logits

    def _advance(self, logits) -> list[Delta | None]:
        alive = [self.seqs[i] for i in self._alive]
        self._next, failed = pick_tokens(logits, alive)
        if failed:
            raise RuntimeError(f"rows that cannot be sampled: {failed}")
        tokens = self._next.tolist()
        events: list[Delta | None] = [None] * len(self.seqs)
        for j, i in enumerate(self._alive):
            s = self.seqs[i]
            if s.finish is None:
                events[i] = s.append(tokens[j])
        return events

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
