"""Batched chat generation with optional per-row edits.

Prompts are single user messages rendered with the model's chat template; batches are left
padded so the last position of every row is a real token (the edit site at prefill). Sampling is
seeded per call, so the same prompts in the same batch give the same text on a rerun.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chameleon.edit import EditBank
from chameleon.model import model_device


def chat_prompt(tok, user_message: str, system: str | None = None) -> str:
    """Render one user turn (plus an optional system turn) ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a template: a plain prompt, so tiny test models work too.
    return (f"{system}\n\n" if system else "") + f"{user_message}\n"


def _encode(tok, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    # Rendered chat prompts already carry their special tokens.
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False, **kwargs)


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
) -> list[str]:
    """Generate an answer for each rendered prompt; `rows[i]` picks prompt i's bank row."""
    if bank is not None and (rows is None or len(rows) != len(prompts)):
        raise ValueError("with an edit bank, give one bank row per prompt")
    tok.padding_side = "left"
    device = model_device(model)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        enc = {k: v.to(device) for k, v in _encode(tok, chunk).items()}
        gen_kwargs = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            do_sample=temperature > 0,
        )
        if temperature > 0:
            gen_kwargs.update(temperature=temperature, top_p=top_p)
        else:
            # Neutralize sampling defaults from generation_config so greedy warns about nothing.
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop_strings:
            gen_kwargs.update(stop_strings=list(stop_strings), tokenizer=tok)
        torch.manual_seed(seed + start)
        if bank is not None:
            with bank.apply(model, rows[start : start + batch_size]):
                out = model.generate(**enc, **gen_kwargs)
        else:
            out = model.generate(**enc, **gen_kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        outputs.extend(tok.batch_decode(new, skip_special_tokens=True))
    return [o.strip() for o in outputs]
