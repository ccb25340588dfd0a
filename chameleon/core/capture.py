"""Hidden states at chosen layers and site, padding-correct, batched.

`capture` returns, for each text, the output of the chosen module (MLP block or whole
decoder layer) at the text's last real token. The position is read from the attention mask, so
left and right padding and any batch size give the same vectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from chameleon.core.generation import length_order
from chameleon.core.model import layer_module, model_device


def _last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row (works for left and right padding)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).amax(1)


class _Captured(Exception):
    """Raised by the deepest hook to end a forward pass whose later layers are not needed."""


@torch.no_grad()
def capture(
    model,
    tok,
    texts: Sequence[str],
    layers: Sequence[int],
    site: str = "mlp",
    batch_size: int = 16,
    reduce: str = "last",
    max_length: int = 1024,
    answer_starts: Sequence[int] | None = None,
    sort_by_length: bool = True,
) -> torch.Tensor:
    """Return float32 [N, len(layers), d] hidden states of `texts` (rendered, special tokens included).

    reduce: `last` = last real token; `mean` = mean over real tokens (used to embed history items);
    `answer_mean` = mean over the tokens from `answer_starts[i]` (the prompt's token count) on,
    i.e. over the answer of a prompt + answer text. Texts are batched in order of their token
    length (less padding; the vectors do not depend on the batch) and returned in input order.
    """
    if reduce not in ("last", "mean", "answer_mean"):
        raise ValueError("reduce must be 'last', 'mean' or 'answer_mean'")
    if reduce == "answer_mean" and (answer_starts is None or len(answer_starts) != len(texts)):
        raise ValueError("answer_mean needs one answer start per text")
    if not texts:
        d = model.config.hidden_size
        return torch.zeros(0, len(layers), d)
    device = model_device(model)
    store: dict[int, torch.Tensor] = {}

    deepest = max(range(len(layers)), key=lambda i: layers[i])

    def make_hook(slot: int):
        def hook(module, args, output):
            store[slot] = output[0] if isinstance(output, tuple) else output
            if len(store) == len(layers) and slot == deepest:
                raise _Captured  # nothing deeper is needed: skip the rest of the forward pass

        return hook

    modules = [layer_module(model, layer, site) for layer in layers]
    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    order = length_order(tok, texts) if sort_by_length else list(range(len(texts)))
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            chunk = [texts[i] for i in idx]
            enc = tok(
                chunk,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=True,
                max_length=max_length,
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            store.clear()
            # Positions count real tokens only, as generate() does, so padding never shifts them.
            enc["position_ids"] = (enc["attention_mask"].cumsum(1) - 1).clamp_min(0)
            # Only the hooked layers are needed: the forward pass stops after the deepest one.
            with contextlib.suppress(_Captured):
                model(**enc)
            mask = enc["attention_mask"]
            if reduce == "answer_mean":
                # Real tokens from the answer's first token on (padding may sit on either side).
                real_before = mask.cumsum(1) - mask
                starts = torch.as_tensor([answer_starts[i] for i in idx], device=mask.device)
                mask = mask * (real_before >= starts[:, None]).to(mask.dtype)
            rows = []
            for slot in range(len(layers)):
                h = store[slot].float()
                if reduce == "last":
                    idx = _last_real_index(mask)
                    rows.append(h[torch.arange(h.shape[0], device=h.device), idx])
                else:
                    w = mask.to(h.dtype)[..., None]
                    rows.append((h * w).sum(1) / w.sum(1).clamp_min(1))
            out.append(torch.stack(rows, 1).cpu())
    finally:
        for h in handles:
            h.remove()
    result = torch.empty(len(texts), *out[0].shape[1:])
    result[torch.tensor(order)] = torch.cat(out)
    return result
