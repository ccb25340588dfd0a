"""`chameleon.serving.admission`: prompt tokens within the limits, sampling made concrete."""

from __future__ import annotations

import pytest
from tiny_models import embedded_tokenizer

from chameleon.serving.admission import Admission, PromptLimits
from chameleon.serving.config import ServeConfig
from chameleon.serving.decoder import GenItem
from chameleon.serving.edit_loader import Resolution
from chameleon.serving.protocol import ApiError
from chameleon.serving.replica_api import ChatTurn, GenerationRequest
from chameleon.serving.sampling import SamplingParams


@pytest.fixture(scope="module")
def limits():
    cfg = ServeConfig(store="/x", max_prompt_tokens=40, max_prompt_chars=200, default_max_tokens=16)
    return PromptLimits(cfg, embedded_tokenizer(), max_context=64)


def chat(text: str, **kw) -> GenerationRequest:
    return GenerationRequest("chat", SamplingParams(**kw), messages=(ChatTurn("user", text),))


def completion(text: str, **kw) -> GenerationRequest:
    return GenerationRequest("completion", SamplingParams(**kw), prompt=text)


def refusal(fn, *args) -> tuple[int, str | None, str | None]:
    with pytest.raises(ApiError) as err:
        fn(*args)
    return err.value.status, err.value.code, err.value.param


def test_prompts_too_long_to_tokenize_are_refused_first(limits):
    limits.check_chars(chat("x" * 190))
    assert refusal(limits.check_chars, chat("x" * 200)) == (400, "context_length_exceeded", "messages")
    assert refusal(limits.check_chars, completion("x" * 201)) == (400, "context_length_exceeded", "prompt")


def test_chat_prompts_use_the_models_template(limits):
    tok = limits.tok
    ids = limits.token_ids(chat("hello"))
    want = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert ids == tok(want, add_special_tokens=False)["input_ids"]
    assert limits.token_ids(completion("hello")) == tok("hello", add_special_tokens=True)["input_ids"]


def test_token_limits(limits):
    assert refusal(limits.token_ids, completion("")) == (400, "invalid_value", "prompt")
    long = " ".join(["word"] * 60)
    assert refusal(limits.token_ids, completion(long)) == (400, "context_length_exceeded", "prompt")


def test_max_tokens_within_the_context(limits):
    assert limits.max_tokens(None, 10) == 16, "the server's default"
    assert limits.max_tokens(None, 60) == 4, "the default shrinks to the room left"
    assert limits.max_tokens(30, 10) == 30
    assert refusal(limits.max_tokens, 60, 10) == (400, "context_length_exceeded", "max_tokens")
    assert refusal(limits.max_tokens, None, 64)[:2] == (400, "context_length_exceeded")


def test_sampling_resolves_against_the_model_and_the_prompt(limits):
    got = limits.resolve_sampling(SamplingParams(top_p=0.5, min_tokens=99), 60, {"temperature": 0.3})
    assert (got.max_tokens, got.min_tokens, got.temperature, got.top_p) == (4, 4, 0.3, 0.5)


def test_an_admission_without_an_edit_releases_nothing():
    item = GenItem([1, 2], SamplingParams().resolved({}, 4))
    adm = Admission(item, Resolution(None, None, "off", None), None, stream=False, admitted_at=1.0)
    assert adm.bank is None and adm.released
    adm.release()
    record = adm.log_record("rid", 3, "stop", 1.5, 2.0)
    assert (record["source"], record["prompt_tokens"], record["ttft_s"]) == ("off", 2, 0.5)
