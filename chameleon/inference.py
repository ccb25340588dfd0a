"""Offline personalized generation from a published run (demo, evaluation).

Builds one `EditBank` holding the edits a batch needs (each user's group edit, or own edit) and
generates for all users in one batched call. Serving uses the same bank with a cache in front.
"""

from __future__ import annotations

from collections.abc import Sequence

from chameleon.config import EditConfig
from chameleon.edit import Edit, EditBank
from chameleon.generation import chat_prompt, generate
from chameleon.model import hidden_size, model_device
from chameleon.runs import PublishedRun

LEVELS = ("none", "group", "user")


def bank_for(model, run: PublishedRun, edits: Sequence[Edit], edit_cfg: EditConfig) -> tuple[EditBank, list[int]]:
    """A bank with the given edits as rows 1..n (row 0 = identity); returns (bank, rows)."""
    layers = sorted({layer for e in edits for layer in e.layers}) or run.manifest["captured_layers"]
    bank = EditBank(
        hidden_size(model), layers, site=run.site, max_rank=int(run.manifest["max_rank"]),
        positions=edit_cfg.positions, device=model_device(model),
    )
    rows = bank.add_many(list(edits), alpha=edit_cfg.alpha, beta=edit_cfg.beta, centered=edit_cfg.centered)
    return bank, rows


def edit_for(run: PublishedRun, user_id: str, level: str, group_id: str | None = None) -> Edit | None:
    """The edit a user gets at `level` (None = base model). `group_id` overrides the assignment."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}")
    if level == "none":
        return None
    if level == "user":
        return run.user_edit(user_id)
    gid = group_id or run.user_group(user_id)
    return run.group_edit(gid) if gid else None


def personalized_generate(
    model,
    tok,
    run: PublishedRun,
    user_ids: Sequence[str],
    queries: Sequence[str],
    *,
    level: str = "group",
    edit_cfg: EditConfig | None = None,
    group_ids: Sequence[str | None] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to `queries[i]` for `user_ids[i]` with the edit of the chosen level."""
    edit_cfg = edit_cfg or EditConfig(**run.manifest["edit"])
    prompts = [chat_prompt(tok, q) for q in queries]
    if level == "none":
        return generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    keys, edits, index = [], [], {}
    for i, uid in enumerate(user_ids):
        gid = group_ids[i] if group_ids else None
        key = (level, gid or (run.user_group(uid) if level == "group" else uid))
        if key not in index:
            edit = edit_for(run, uid, level, gid)
            index[key] = None if edit is None else len(edits)
            if edit is not None:
                edits.append(edit)
        keys.append(key)
    bank, rows = bank_for(model, run, edits, edit_cfg)
    row_of = [0 if index[k] is None else rows[index[k]] for k in keys]
    return generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, bank=bank, rows=row_of)
