"""The one way to generate with per-row edits.

`generate_answers` answers single-turn chat messages greedily (or sampled), each row with its own
`Edit` or none, in one `EditBank` per call: users of one group share one Edit object, so a batch
gets one bank row per group, not per user. `generate` is the lower-level loop over rendered
prompts that it (and the synthesis) runs.

Prompts are rendered with the model's chat template; batches are left padded so the last position
of every row is a real token (the edit site at prefill). Sampling draws from a private RNG
seeded per batch, so a rerun gives the same text and the caller's global RNG is left untouched.

Serving has its own decode loop (it streams, samples per row and retires finished rows mid-batch);
its parity with this module is tested.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from chameleon.config import EditConfig
from chameleon.core.edit import Edit, EditBank
from chameleon.core.model import hidden_size, model_device

# ---------------------------------------------------------------------------------------------
# Clean-up of a reply: the one every evaluated method and the demo get


_LEAD_IN = re.compile(
    r"^(?:here(?:'s| is| are)\b[^:]*:|(?:the )?(?:paraphrased|rewritten|original|neutral)(?: tweet| version| text)?\s*:|"
    r"(?:tweet|paraphrase|answer)\s*:|sure\b[^:]*:)\s*",
    re.IGNORECASE,
)
_QUOTES = ('"', "'", "“", "”", "‘", "’")


def first_answer_line(text: str) -> str:
    """The answer in a generated reply: the one clean-up every method gets before scoring.

    Takes the first non-empty line; if it is only a lead-in ending with ``':'`` (such as "Here's a
    rewritten version of the tweet:") and another line follows, the next non-empty line instead.
    Then strips lead-ins at its start ("Paraphrased tweet: …", "Sure! Here it is: …") and
    quotes around it. Empty input gives ``""``.
    """
    lines = [ln.strip() for ln in str(text).splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return ""
    answer = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    for _ in range(2):
        answer = _LEAD_IN.sub("", answer).strip()
        if len(answer) >= 2 and answer[0] in _QUOTES and answer[-1] in _QUOTES:
            answer = answer[1:-1].strip()
    return answer


def chat_prompt(tok, user_message: str, system: str | None = None) -> str:
    """Render one user turn (plus an optional system turn) ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_message}
    ]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a template: a plain prompt, so tiny test models work too.
    return (f"{system}\n\n" if system else "") + f"{user_message}\n"


def encode(tok, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded batch encoding of rendered prompts (they already carry their special tokens)."""
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return tok(
        list(texts),
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,
        **kwargs,
    )


class RowSampler:
    """Temperature / top-p sampling in which row i draws from its own generator seeded with
    `seeds[i]`: a row's text does not depend on which rows share its batch (HF's sampling draws
    the whole batch from one RNG). Run with `do_sample=False`: every other token is masked, so the
    greedy pick is the sampled one."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.gens)]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), torch.cat(picks).to(scores.device)] = 0.0
        return out


@dataclass
class TokenCount:
    tokens: int = 0
    """Tokens generated (padding after a finished row not counted)."""


_counters: contextvars.ContextVar[tuple[TokenCount, ...]] = contextvars.ContextVar("counters", default=())


@contextlib.contextmanager
def count_generated_tokens() -> Iterator[TokenCount]:
    """Count the tokens every `generate` call inside the block produces (for progress figures)."""
    count = TokenCount()
    reset = _counters.set((*_counters.get(), count))
    try:
        yield count
    finally:
        _counters.reset(reset)


def length_order(tok, texts: Sequence[str]) -> list[int]:
    """Indices of `texts` by token length (ties in input order): batches of alike lengths."""
    lengths = [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]] if texts else []
    return sorted(range(len(texts)), key=lambda i: (lengths[i], i))


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    bank: EditBank | None = None,
    rows: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    sort_by_length: bool = True,
    row_seeds: Sequence[int] | None = None,
) -> list[str]:
    """Generate an answer for each rendered prompt; `rows[i]` picks prompt i's bank row.

    Prompts are batched in order of their token length (`length_order`: batches pad little), and
    the answers come back in input order. Greedy answers are those of the unsorted order; sampled
    ones are seeded per batch (`seed` + the batch's start), so they depend on the set of prompts,
    unless `row_seeds[i]` seeds prompt i's own sampling (`RowSampler`)."""
    if bank is not None and (rows is None or len(rows) != len(prompts)):
        raise ValueError("with an edit bank, give one bank row per prompt")
    device = model_device(model)
    order = length_order(tok, prompts) if sort_by_length else list(range(len(prompts)))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        idx = order[start : start + batch_size]
        chunk = [prompts[i] for i in idx]
        enc = {k: v.to(device) for k, v in encode(tok, chunk).items()}
        gen_kwargs = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            do_sample=temperature > 0,
        )
        if temperature > 0 and row_seeds is not None:
            sampler = RowSampler([row_seeds[i] for i in idx], temperature, top_p)
            gen_kwargs.update(
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=LogitsProcessorList([sampler]),
            )
        elif temperature > 0:
            gen_kwargs.update(temperature=temperature, top_p=top_p)
        else:
            # Neutralize sampling defaults from generation_config so greedy warns about nothing.
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop_strings:
            gen_kwargs.update(stop_strings=list(stop_strings), tokenizer=tok)
        # HF sampling reads the global RNG: fork it so seeding here leaves the caller's untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + start)
            if bank is not None:
                with bank.apply(model, [rows[i] for i in idx]):
                    out = model.generate(**enc, **gen_kwargs)
            else:
                out = model.generate(**enc, **gen_kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        if _counters.get():
            produced = int((new != tok.pad_token_id).sum())
            for count in _counters.get():
                count.tokens += produced
        for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True), strict=True):
            outputs[i] = text.strip()
    return outputs


def distinct_edits(edits: Sequence[Edit | None]) -> tuple[list[Edit], list[int]]:
    """(the distinct edits, by identity, in first-use order; per row its index there or -1 for none)."""
    index_of: dict[int, int] = {}
    unique: list[Edit] = []
    index = []
    for e in edits:
        if e is None:
            index.append(-1)
            continue
        if id(e) not in index_of:
            index_of[id(e)] = len(unique)
            unique.append(e)
        index.append(index_of[id(e)])
    return unique, index


def bank_for_edits(model, edits: Sequence[Edit], edit_cfg: EditConfig) -> tuple[EditBank, list[int]]:
    """An EditBank with the given (distinct) edits as rows 1..n (row 0 = identity); returns (bank, rows)."""
    if not edits:
        raise ValueError("bank_for_edits needs at least one edit")
    sites = {e.site for e in edits}
    if len(sites) > 1:
        raise ValueError(f"edits of one bank must share a site, got {sorted(sites)}")
    layers = sorted({layer for e in edits for layer in e.layers})
    max_rank = max(int(e.theta_p.shape[1]) for e in edits)
    bank = EditBank(
        hidden_size(model),
        layers,
        site=sites.pop(),
        max_rank=max_rank,
        positions=edit_cfg.positions,
        device=model_device(model),
    )
    rows = bank.add_many(list(edits), alpha=edit_cfg.alpha, beta=edit_cfg.beta, centered=edit_cfg.centered)
    return bank, rows


def generate_answers(
    model,
    tok,
    messages: Sequence[str],
    *,
    edits: Sequence[Edit | None] | None = None,
    edit_cfg: EditConfig | None = None,
    system: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy raw answers to each user message (chat template, one user turn after an optional
    `system` turn), with ``edits[i]`` applied to message i (None = base model for that row).

    Messages are batched in order of their token length (less padding, same results for a given
    set), and returned in input order.
    """
    n = len(messages)
    if edits is not None and len(edits) != n:
        raise ValueError(f"{len(edits)} edits for {n} messages")
    prompts = [chat_prompt(tok, m, system) for m in messages]
    order = length_order(tok, prompts)
    bank, row_of = None, [0] * n
    unique, index = distinct_edits(edits or [])
    if unique:
        bank, rows = bank_for_edits(model, unique, edit_cfg or EditConfig())
        row_of = [0 if i < 0 else rows[i] for i in index]
    out: list[str] = [""] * n
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        bank_rows = {"bank": bank, "rows": [row_of[i] for i in idx]} if bank is not None else {}
        texts = generate(
            model,
            tok,
            [prompts[i] for i in idx],
            max_new_tokens=max_new_tokens,
            batch_size=len(idx),
            **bank_rows,
        )
        for i, t in zip(idx, texts, strict=True):
            out[i] = t
        if progress:
            progress(min(start + batch_size, n), n)
    return out
