"""How one sequence is sampled: `SamplingParams`, as vLLM's, built once from the OpenAI body.

No Ray, no torch, no web framework. The ingress builds a request's `SamplingParams` from its body
(`protocol.RequestBody.sampling_params`), the typed request carries it across the Ray handle
(`replica_api.GenerationRequest`), and the replica makes it concrete (`resolved`: the model's
generation config and the server's max_tokens fill what the request left unset) before the engine
decodes with it (`decoder.GenItem`). The values were validated at the ingress (protocol's bounds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
"""What a setting the request and the model's generation config leave unset means (OpenAI's and
vLLM's defaults; `top_k` 0 = off)."""

MODEL_DEFAULT_KEYS = tuple(NEUTRAL)
"""Settings a model's generation config may default (as vLLM and Ray Serve LLM use them)."""


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling settings. None in `max_tokens` and the `MODEL_DEFAULT_KEYS`: not set
    by the request (see `resolved`)."""

    max_tokens: int | None = None
    temperature: float | None = None
    """0: greedy."""
    top_p: float | None = None
    top_k: int | None = None
    """0 or -1: all tokens."""
    min_p: float | None = None
    repetition_penalty: float | None = None
    """Over prompt and output tokens, as transformers and vLLM (divide positive logits, multiply negative)."""
    frequency_penalty: float = 0.0
    """OpenAI's: minus penalty × count of the token in the output so far."""
    presence_penalty: float = 0.0
    """OpenAI's: minus penalty once the token appeared in the output."""
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    """End the sequence on these tokens (not part of the output), besides end-of-sequence."""
    min_tokens: int = 0
    """End-of-sequence and `stop_token_ids` are masked until this many tokens were generated."""
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1
    """Choices per request; this server answers one (protocol refuses others)."""

    @property
    def is_resolved(self) -> bool:
        """Every setting concrete (what the engine decodes with)."""
        return self.max_tokens is not None and all(getattr(self, k) is not None for k in MODEL_DEFAULT_KEYS)

    def resolved(self, model_defaults: Mapping[str, Any], max_tokens: int) -> SamplingParams:
        """These settings made concrete: unset ones from `model_defaults` (`model_sampling_defaults`),
        else `NEUTRAL`; `max_tokens` as the replica allows it (the request's, within the context);
        `min_tokens` never past it."""
        filled = {
            k: v if (v := getattr(self, k)) is not None else model_defaults.get(k, NEUTRAL[k])
            for k in MODEL_DEFAULT_KEYS
        }
        return dataclasses.replace(
            self,
            max_tokens=max_tokens,
            temperature=float(filled["temperature"]),
            top_p=float(filled["top_p"]),
            top_k=max(0, int(filled["top_k"])),
            min_p=float(filled["min_p"]),
            repetition_penalty=float(filled["repetition_penalty"]),
            min_tokens=min(self.min_tokens, max_tokens),
        )

    @property
    def plain(self) -> bool:
        """Greedy with no logits processing: plain argmax (resolved settings only)."""
        return (
            self.temperature is not None
            and self.temperature <= 0
            and self.repetition_penalty == 1.0
            and not self.frequency_penalty
            and not self.presence_penalty
            and not self.min_tokens
        )


def model_sampling_defaults(model) -> dict[str, Any]:
    """Sampling settings the model's generation config sets explicitly (as vLLM and Ray Serve LLM
    use them): they apply where a request gives none."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return {}
    try:
        explicit = gen.to_diff_dict()
    except Exception:  # an odd config: no defaults rather than no server
        return {}
    return {k: explicit[k] for k in MODEL_DEFAULT_KEYS if explicit.get(k) is not None}
