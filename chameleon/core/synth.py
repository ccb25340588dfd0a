"""Fake it: pick representative history, write insights, generate paired answers, capture them.

`synthesize` turns a list of users into their synthetic preference pairs and hidden states. All
users of the list are batched together at every step (history embedding, insights, answers,
capture), so a partition of 64 users costs a few large `generate()` calls, not 64 small ones.
No gold outputs are used: queries come from the users' own history items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chameleon.config import ChameleonConfig
from chameleon.core import prompts
from chameleon.core.capture import capture
from chameleon.core.generation import chat_prompt, generate
from chameleon.core.model import num_layers
from chameleon.core.records import UserRecord


def select_history(embeddings: torch.Tensor, k: int) -> list[int]:
    """Indices of up to k items that load most on the top principal components.

    PCA of the centered item embeddings [n, d]; for each of the top components in turn, take the
    not-yet-chosen item with the largest |score|. With n <= k every item is kept. The result is
    sorted (history order).
    """
    n = embeddings.shape[0]
    if n <= k:
        return list(range(n))
    x = embeddings.float() - embeddings.float().mean(0, keepdim=True)
    U, S, _ = torch.linalg.svd(x, full_matrices=False)
    scores = (U * S).abs()  # [n, n_components]
    chosen: list[int] = []
    comp = 0
    while len(chosen) < k:
        order = scores[:, comp % scores.shape[1]].argsort(descending=True).tolist()
        chosen.append(next(i for i in order if i not in chosen))
        comp += 1
    return sorted(chosen)


def history_layer(model) -> int:
    """Layer whose mean-pooled residual stream embeds history items (middle of the network)."""
    return num_layers(model) // 2


@dataclass
class UserPairs:
    """One user's synthetic data."""

    user_id: str
    group_id: str | None
    selected: list[int]
    history_embedding: torch.Tensor
    """[d] mean of the user's history-item embeddings (assigns unseen users to groups)."""
    insight_p: str
    insight_n: str
    queries: list[str]
    personalized: list[str]
    neutral: list[str]
    emb_p: torch.Tensor
    """[K, L, d] at the captured layers"""
    emb_n: torch.Tensor


def pair_queries(user: UserRecord, selected: Sequence[int], k: int) -> list[str]:
    """K queries: the selected items' queries, cycled when K exceeds them."""
    queries = user.queries()
    chosen = [queries[i] for i in selected]
    return [chosen[j % len(chosen)] for j in range(k)]


def embed_history(model, tok, users: Sequence[UserRecord], cfg: ChameleonConfig) -> list[torch.Tensor]:
    """Per user, [n_items, d] mean-pooled embeddings of its history texts."""
    texts = [h.text for u in users for h in u.history]
    emb = capture(
        model,
        tok,
        texts,
        [history_layer(model)],
        site="residual",
        batch_size=cfg.synth.batch_size,
        reduce="mean",
        max_length=256,
    )[:, 0]
    out, start = [], 0
    for u in users:
        out.append(emb[start : start + len(u.history)])
        start += len(u.history)
    return out


def synthesize(
    model, tok, users: Sequence[UserRecord], cfg: ChameleonConfig, layers: Sequence[int]
) -> list[UserPairs]:
    """Fake it for every user of the list; hidden states at `layers` and `cfg.subspace.site`."""
    if not users:
        return []
    s = cfg.synth
    item_embs = embed_history(model, tok, users, cfg)
    if s.selection_embedding == "model":
        selected = [select_history(e, s.history_k) for e in item_embs]
    else:
        selected = [list(range(min(len(u.history), s.history_k))) for u in users]

    # Insights: two per user, one batched generate() for all users of the list.
    insight_requests = []
    for u, sel in zip(users, selected, strict=True):
        p, n = prompts.insight_prompts([u.history[i].text for i in sel])
        insight_requests += [chat_prompt(tok, p), chat_prompt(tok, n)]
    insights = generate(
        model,
        tok,
        insight_requests,
        max_new_tokens=s.insight_max_new_tokens,
        temperature=0.0,
        batch_size=s.batch_size,
        seed=s.seed,
    )
    insight_p, insight_n = insights[0::2], insights[1::2]

    # Paired answers: K queries per user, each answered under both insights.
    queries = [pair_queries(u, sel, s.pairs_per_user) for u, sel in zip(users, selected, strict=True)]
    answer_requests = []
    for q_list, ip, inn in zip(queries, insight_p, insight_n, strict=True):
        for q in q_list:
            p, n = prompts.answer_prompts(q, ip, inn)
            answer_requests += [chat_prompt(tok, p), chat_prompt(tok, n)]
    answers = generate(
        model,
        tok,
        answer_requests,
        max_new_tokens=s.answer_max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        batch_size=s.batch_size,
        seed=s.seed,
    )

    # Capture "query + answer" as the model would see it at inference: the plain query, no insight.
    texts = []
    for q_list, j in zip(queries, range(len(users)), strict=True):
        base = j * 2 * s.pairs_per_user
        for i, q in enumerate(q_list):
            prompt = chat_prompt(tok, q)
            texts += [prompt + answers[base + 2 * i], prompt + answers[base + 2 * i + 1]]
    hidden = capture(model, tok, texts, list(layers), cfg.subspace.site, batch_size=s.batch_size)

    out = []
    K = s.pairs_per_user
    for j, u in enumerate(users):
        a = answers[j * 2 * K : (j + 1) * 2 * K]
        h = hidden[j * 2 * K : (j + 1) * 2 * K]
        out.append(
            UserPairs(
                user_id=u.user_id,
                group_id=u.group_id,
                selected=selected[j],
                history_embedding=item_embs[j].mean(0),
                insight_p=insight_p[j],
                insight_n=insight_n[j],
                queries=queries[j],
                personalized=a[0::2],
                neutral=a[1::2],
                emb_p=h[0::2].clone(),
                emb_n=h[1::2].clone(),
            )
        )
    return out
