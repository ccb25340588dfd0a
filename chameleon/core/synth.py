"""Fake it: pick representative history, make (personalized, neutral) answer pairs, capture them.

`synthesize` turns a list of users into their preference pairs and hidden states, from one of two
sources (`synth.pair_source`):

- `history`: the personalized answer is the user's own text; the neutral one is the model's own
  answer to the same query. The query is the item's `input`, or a neutral version of the text
  the model fakes (LaMP-7's inputs were made that way), wrapped in `synth.query_template`.
- `insight` (the paper's variant): the model writes a personalized and a neutral insight from
  the selected history, then answers each query under both.
- `style`: every history item not held out is a pair: the personalized answer is the raw text,
  the neutral answer is its neutral rendering (`core.normalize`), and the query is the template
  around that rendering (or the item's `input`). Both answers render the query's content, so the
  pair differs in style only, not in content or in how much it copies; no generation. Its
  held-out items are asked with the neutral rendering as the query too, so calibration scores
  the raw text given a query that does not contain it.

Both capture "query + answer" exactly as the model sees it at inference (chat template and the
task's system prompt, no insight). A few items per user are held out of the pairs
(`synth.heldout_items`) with their queries, for self-calibration. All users of the list are
batched together at every step, so a partition costs a few large `generate()` calls. No gold
output of any evaluated query is used: queries come from the users' own history items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from chameleon.config import ChameleonConfig
from chameleon.core import prompts
from chameleon.core.capture import capture
from chameleon.core.devices import batch_size_for
from chameleon.core.generation import chat_prompt, generate
from chameleon.core.markers import MARKERS, history_shares
from chameleon.core.model import model_device, num_layers
from chameleon.core.normalize import neutralize
from chameleon.core.records import UserRecord
from chameleon.core.style import history_style


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
    heldout_queries: list[str] = field(default_factory=list)
    """Queries of the held-out history items (rendered as at inference, without the chat template)."""
    heldout_texts: list[str] = field(default_factory=list)
    """The held-out items' real texts: what calibration asks the edited model to find likely."""
    style_features: torch.Tensor | None = None
    """[F] mean stylometric features of the user's history (`core.style`), for style grouping."""
    shared_diff: torch.Tensor | None = None
    """`style` source with `synth.shared_pairs`: [L, d] sum over the user's shared pairs (raw text
    vs the model's own answer to the same query) of h_P − h_N: what every user's edit shares."""
    shared_norm: torch.Tensor | None = None
    """[L] sum over the shared pairs of the mean state norm of their two sides."""
    shared_count: int = 0
    marker_shares: list[float] | None = None
    """Per marker of `core.markers.MARKERS`, the share of the user's history items that carry it,
    over every item but the evaluation's reference items (which marker parts the user gets)."""


def pair_queries(user: UserRecord, selected: Sequence[int], k: int, template: str = "{text}") -> list[str]:
    """K queries: the selected items' queries, cycled when K exceeds them."""
    queries = user.queries(template)
    chosen = [queries[i] for i in selected]
    return [chosen[j % len(chosen)] for j in range(k)]


def heldout_indices(user: UserRecord, selected: Sequence[int], n: int) -> list[int]:
    """Up to n history items not among `selected`, spread evenly over the rest of the history."""
    rest = [i for i in range(len(user.history)) if i not in set(selected)]
    if len(rest) <= n:
        return rest
    step = len(rest) / n
    return [rest[int(j * step)] for j in range(n)]


def fake_queries(model, tok, texts: Sequence[str], cfg: ChameleonConfig) -> list[str]:
    """Task queries for texts that came without one: the model rewrites each text neutrally
    (greedy, as the benchmark's own inputs were made), and the template wraps the result."""
    s = cfg.synth
    if not texts:
        return []
    requests = [chat_prompt(tok, s.neutralize_prompt.format(text=t)) for t in texts]
    neutral = generate(
        model, tok, requests, max_new_tokens=s.answer_max_new_tokens, batch_size=s.batch_size, seed=s.seed
    )
    return [s.query_template.format(text=first_line(n) or t) for n, t in zip(neutral, texts, strict=True)]


def first_line(text: str) -> str:
    """The first non-empty line, without surrounding quotes (what a chatty model's answer means)."""
    for line in text.splitlines():
        line = line.strip().strip('"“”').strip()
        if line:
            return line
    return ""


def _item_queries(
    model, tok, users: Sequence[UserRecord], items: Sequence[Sequence[int]], cfg: ChameleonConfig
) -> list[list[str]]:
    """Per user, the query of each chosen item: its input, or a faked neutral query."""
    s = cfg.synth
    need = [
        (j, i)
        for j, (u, idx) in enumerate(zip(users, items, strict=True))
        for i in idx
        if not u.history[i].input
    ]
    texts = [users[j].history[i].text for j, i in need]
    made = (
        fake_queries(model, tok, texts, cfg)
        if s.query_faking == "neutralize"
        else [s.query_template.format(text=t) for t in texts]
    )
    faked = dict(zip(need, made, strict=True))
    return [
        [faked.get((j, i)) or u.history[i].input or "" for i in idx]
        for j, (u, idx) in enumerate(zip(users, items, strict=True))
    ]


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


def control_tokens(tok) -> set[str]:
    """Strings the tokenizer turns into control tokens (special and added tokens)."""
    found = set(getattr(tok, "all_special_tokens", []) or [])
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    found |= {str(getattr(t, "content", t)) for t in decoder.values()}
    return found


def as_data(tok, users: Sequence[UserRecord]) -> list[UserRecord]:
    """Users whose history texts and inputs cannot spell a control token (prompts.py): whatever
    prompt, query or captured answer they end up in, the model sees them as plain text."""
    controls = control_tokens(tok)

    def clean(text: str | None) -> str | None:
        return None if text is None else prompts.defang_control_tokens(text, controls)

    return [
        replace(
            u,
            history=tuple(replace(h, text=clean(h.text), input=clean(h.input)) for h in u.history),
            query=clean(u.query),
        )
        for u in users
    ]


def with_device_batch_size(cfg: ChameleonConfig, model) -> ChameleonConfig:
    """`cfg` with `synth.batch_size: auto` made the number for the model's device."""
    size = batch_size_for(cfg.synth.batch_size, model_device(model))
    return cfg.model_copy(update={"synth": cfg.synth.model_copy(update={"batch_size": size})})


def synthesize(
    model, tok, users: Sequence[UserRecord], cfg: ChameleonConfig, layers: Sequence[int]
) -> list[UserPairs]:
    """Fake it for every user of the list; hidden states at `layers` and `cfg.subspace.site`."""
    if not users:
        return []
    users = as_data(tok, users)  # history is data in every prompt built below
    cfg = with_device_batch_size(cfg, model)
    s = cfg.synth
    item_embs = embed_history(model, tok, users, cfg)
    # Held-out items first (spread over the history), so the selection never takes them.
    heldout = [
        heldout_indices(u, [], s.heldout_items) if len(u.history) > s.heldout_items else [] for u in users
    ]
    # Reference items (evaluation's style checks) are kept out of pairs and calibration alike.
    reserved = [
        held + (heldout_indices(u, held, s.reference_items) if s.reference_items else [])
        for u, held in zip(users, heldout, strict=True)
    ]
    selected = []
    for u, emb, res in zip(users, item_embs, reserved, strict=True):
        pool = [i for i in range(len(u.history)) if i not in set(res)]
        if not pool:
            selected.append([])
        elif s.pair_source == "style":  # every item not held out, spread when over the cap
            selected.append(
                heldout_indices(u, res, s.style_max_items) if len(pool) > s.style_max_items else pool
            )
        elif s.selection_embedding == "model":
            selected.append(sorted(pool[j] for j in select_history(emb[pool], s.history_k)))
        else:
            selected.append(pool[: s.history_k])
    pair_source = {"history": _history_pairs, "insight": _insight_pairs, "style": _style_pairs}[s.pair_source]
    out = pair_source(model, tok, users, cfg, layers, item_embs, selected, heldout)
    for pairs, u, held, res in zip(out, users, heldout, reserved, strict=True):
        # Style groups and marker parts read every item but the evaluation's reference items.
        references = set(res) - set(held)
        own = [h.text for i, h in enumerate(u.history) if i not in references]
        pairs.style_features = torch.from_numpy(history_style(own)).float()
        shares = history_shares(own)
        pairs.marker_shares = [shares[m] for m in MARKERS]
    return out


def capture_answers(
    model, tok, prompts: Sequence[str], answers: Sequence[str], cfg: ChameleonConfig, layers: Sequence[int]
) -> torch.Tensor:
    """Hidden states of rendered prompt + answer, at the answer's last token or over its tokens
    (`synth.capture_tokens`), at `subspace.site`: what the synthesis stores for every pair."""
    texts = [p + a for p, a in zip(prompts, answers, strict=True)]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    reduce = "last" if cfg.synth.capture_tokens == "last" else "answer_mean"
    return capture(
        model,
        tok,
        texts,
        list(layers),
        cfg.subspace.site,
        batch_size=cfg.synth.batch_size,
        reduce=reduce,
        answer_starts=starts,
    )


def _history_pairs(model, tok, users, cfg, layers, item_embs, selected, heldout) -> list[UserPairs]:
    """Personalized = the user's own text; neutral = the model's answer to the same query."""
    s = cfg.synth
    items = [[sel[j % len(sel)] for j in range(min(s.pairs_per_user, len(sel)))] for sel in selected]
    queries = _item_queries(
        model, tok, users, [it + held for it, held in zip(items, heldout, strict=True)], cfg
    )
    pair_q = [q[: len(it)] for q, it in zip(queries, items, strict=True)]
    held_q = [q[len(it) :] for q, it in zip(queries, items, strict=True)]
    prompts = [chat_prompt(tok, q, s.system_prompt) for qs in pair_q for q in qs]
    own = generate(
        model, tok, prompts, max_new_tokens=s.answer_max_new_tokens, batch_size=s.batch_size, seed=s.seed
    )
    real = [u.history[i].text for u, it in zip(users, items, strict=True) for i in it]
    hidden = capture_answers(model, tok, prompts + prompts, real + own, cfg, layers)
    n = len(prompts)
    out, start = [], 0
    for j, u in enumerate(users):
        k = len(items[j])
        out.append(UserPairs(
            user_id=u.user_id, group_id=u.group_id, selected=selected[j],
            history_embedding=item_embs[j].mean(0), insight_p="", insight_n="",
            queries=pair_q[j], personalized=real[start : start + k], neutral=own[start : start + k],
            emb_p=hidden[start : start + k].clone(), emb_n=hidden[n + start : n + start + k].clone(),
            heldout_queries=held_q[j], heldout_texts=[u.history[i].text for i in heldout[j]],
        ))  # fmt: skip
        start += k
    return out


def row_seed(seed: int, user_id: str, i: int) -> int:
    """The sampling seed of a user's i-th generation: a function of (seed, user id, i) only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{user_id}:{i}".encode()).digest()[:8], "big") >> 1


def _insight_pairs(model, tok, users, cfg, layers, item_embs, selected, heldout) -> list[UserPairs]:
    """The paper's pairs: the model's answers under a personalized vs a neutral insight."""
    s = cfg.synth
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
    queries = [
        pair_queries(u, sel, s.pairs_per_user, s.query_template)
        for u, sel in zip(users, selected, strict=True)
    ]
    held_q = _item_queries(model, tok, users, heldout, cfg)
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
        # Seeded per user and answer: a user's pairs do not depend on the rest of the batch, so a
        # refresh that maps a few users alone gets what a full run gets for them.
        row_seeds=[
            row_seed(s.seed, u.user_id, i)
            for u, q in zip(users, queries, strict=True)
            for i in range(2 * len(q))
        ],
    )

    # Capture "query + answer" as the model would see it at inference: the plain query, no insight.
    rendered = [chat_prompt(tok, q, s.system_prompt) for q_list in queries for q in q_list for _ in range(2)]
    hidden = capture_answers(model, tok, rendered, answers, cfg, layers)

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
                heldout_queries=held_q[j],
                heldout_texts=[u.history[i].text for i in heldout[j]],
            )
        )
    return out


def style_query(item, template: str) -> tuple[str, str]:
    """(query, neutral answer) of one history item for the style source: the item's neutral
    rendering, asked as the template around it (or as the item's own `input`)."""
    neutral = neutralize(item.text)
    return (item.input or template.format(text=neutral or item.text)), neutral


def _style_pairs(model, tok, users, cfg, layers, item_embs, selected, heldout) -> list[UserPairs]:
    """Personalized = the user's raw text; neutral = its neutral rendering; query = around the rendering."""
    s = cfg.synth
    made = [
        [style_query(u.history[i], s.query_template) for i in sel]
        for u, sel in zip(users, selected, strict=True)
    ]
    prompts = [chat_prompt(tok, q, s.system_prompt) for qs in made for q, _ in qs]
    real = [u.history[i].text for u, sel in zip(users, selected, strict=True) for i in sel]
    neutral = [n for qs in made for _, n in qs]
    hidden = capture_answers(model, tok, prompts + prompts, real + neutral, cfg, layers) if prompts else None
    n = len(prompts)
    out, start = [], 0
    for j, u in enumerate(users):
        k = len(selected[j])
        emb_p = (
            hidden[start : start + k].clone() if k else torch.zeros(0, len(layers), item_embs[j].shape[-1])
        )
        emb_n = hidden[n + start : n + start + k].clone() if k else emb_p.clone()
        out.append(UserPairs(
            user_id=u.user_id, group_id=u.group_id, selected=selected[j],
            history_embedding=item_embs[j].mean(0), insight_p="", insight_n="",
            queries=[q for q, _ in made[j]], personalized=real[start : start + k],
            neutral=neutral[start : start + k], emb_p=emb_p, emb_n=emb_n,
            heldout_queries=[style_query(u.history[i], s.query_template)[0] for i in heldout[j]],
            heldout_texts=[u.history[i].text for i in heldout[j]],
        ))  # fmt: skip
        start += k
    _add_shared_pairs(model, tok, users, cfg, layers, selected, made, out)
    return out


def _add_shared_pairs(model, tok, users, cfg, layers, selected, made, out: list[UserPairs]) -> None:
    """`synth.shared_pairs` items per user (spread over its pairs) also contrast the raw text with
    the model's own answer to the same query: "a person's tweet, not an assistant's answer", what
    every user shares. Only their per-user sums are kept (the global edit pools them)."""
    s = cfg.synth
    if not s.shared_pairs:
        return
    picks = [
        [j * len(sel) // min(s.shared_pairs, len(sel)) for j in range(min(s.shared_pairs, len(sel)))]
        if sel
        else []
        for sel in selected
    ]
    prompts = [chat_prompt(tok, made[u][j][0], s.system_prompt) for u, js in enumerate(picks) for j in js]
    if not prompts:
        return
    own = generate(
        model, tok, prompts, max_new_tokens=s.answer_max_new_tokens, batch_size=s.batch_size, seed=s.seed
    )
    real = [users[u].history[selected[u][j]].text for u, js in enumerate(picks) for j in js]
    hidden = capture_answers(model, tok, prompts + prompts, real + own, cfg, layers)
    n, start = len(prompts), 0
    for u, js in enumerate(picks):
        k = len(js)
        p, q = hidden[start : start + k], hidden[n + start : n + start + k]
        out[u].shared_diff = (p - q).sum(0)
        out[u].shared_norm = ((p.norm(dim=-1) + q.norm(dim=-1)) / 2).sum(0)
        out[u].shared_count = k
        start += k
