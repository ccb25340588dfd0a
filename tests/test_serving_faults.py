"""One request or one thread must never take down other users (issue 19), without Ray or Serve:
the replica's core (`ModelServer`) over a run of the job, requests answered as the app answers
them (`chameleon.serving.local`), the engine and its health, run switches.

Each test fails with its defect put back (noted per test).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch
from conftest import copy_run
from reference_decoder import ReferenceDecoder, gen_item

from chameleon.data.storage import LocalStore
from chameleon.serving.config import ServeConfig
from chameleon.serving.decoder import SamplingError, default_eos_ids, pick_tokens
from chameleon.serving.engine import Engine, EngineDeadError
from chameleon.serving.local import answer
from chameleon.serving.protocol import TEMPLATE_KWARGS, ApiError, ChatRequest, decode_body
from chameleon.serving.replica import ModelServer

RUN = "tiny-run-1"


@pytest.fixture(scope="module")
def served(published_tiny_run, tmp_path_factory):
    """A ModelServer (no Ray) over a copy of the job's tiny run in a local store."""
    src, _manifest, model_dir = published_tiny_run
    store = LocalStore(tmp_path_factory.mktemp("faults-store"))
    copy_run(src, store, RUN, set_latest=True)
    cfg = ServeConfig(
        store=store.uri,
        model=str(model_dir),
        edit_cache_size=2,
        max_prompt_tokens=256,
        max_tokens_limit=8,
        default_max_tokens=4,
        refresh_interval_s=0.2,
        log_requests=False,
    )
    core = ModelServer(cfg, store)
    assert core.registry.current is not None, core.registry.status()
    loop = asyncio.new_event_loop()
    yield core, store, src, loop
    core.stop_polling()
    loop.close()


def ask(served, body: dict | bytes, kind: str = "chat"):
    core, _, _, loop = served
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return loop.run_until_complete(answer(core, kind, raw))


def chat(core, content: str = "hello there", **kw) -> dict:
    return {
        "model": core.cfg.model_name,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        **kw,
    }


def members(core) -> list[str]:
    run = core.registry.current
    return sorted(u for u, g in run.user_groups.items() if g in run.group_ids)


# --------------------------------------------------------------------------------------------
# 1. Sampling that cannot produce NaN; a poison row fails alone


def test_sampler_never_raises_and_only_undefined_rows_fail():
    """Defect put back (no temperature floor, no checks before the draw): multinomial raises."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 10
    tok = type("T", (), {"decode": lambda self, ids, skip_special_tokens=True: ""})()
    from chameleon.serving.decoder import SeqState

    items = [
        gen_item([1, 2], 4, temperature=1e-40),
        gen_item([1, 2], 4, temperature=1e-40, top_k=5),
        gen_item([1, 2], 4, temperature=0.7, repetition_penalty=1e-45),
        gen_item([1, 2], 4, temperature=5e-324, top_p=1e-300, min_p=1.0),
        gen_item([1, 2], 4, temperature=float("nan")),  # only the engine can be handed this
        gen_item([1, 2], 4, temperature=1.0, presence_penalty=float("inf")),
    ]
    seqs = [SeqState.new(it, tok, [0], "cpu") for it in items]
    for s in seqs:
        s.out_ids = [3]
    tokens, failed = pick_tokens(logits, seqs)
    assert sorted(failed) == [4, 5], failed
    assert all("sampling settings" in m for m in failed.values())
    ok = [j for j in range(6) if j not in failed]
    assert all(0 <= int(tokens[j]) < 50 for j in ok)
    # A tiny temperature is greedy in effect (raised to 1e-2 it stays far below any logit gap).
    assert int(tokens[0]) == int(torch.argmax(logits[0]))


def test_a_poison_row_fails_alone_and_the_others_are_untouched(served):
    """Defect put back (the sampler raising inside the step): every row of the step fails."""
    core = served[0]
    model, tok = core.model, core.tok
    eos = default_eos_ids(model, tok)
    prompts = [tok(f"question number {i}", add_special_tokens=False).input_ids for i in range(5)]
    want = [
        ReferenceDecoder(model, tok, [gen_item(p, 6, ignore_eos=True)], None, eos).run()[0][1]
        for p in prompts
    ]
    engine = Engine(model, tok, eos, max_running=8)
    results: list = [None] * 6
    done = [threading.Event() for _ in range(6)]

    def sink(i):
        def put(items):
            for x in items:
                if isinstance(x, BaseException):
                    results[i] = x
                    done[i].set()
                    return
                results[i] = (results[i] or []) + x.token_ids
                if x.finish_reason:
                    done[i].set()

        return put

    try:
        for i, p in enumerate(prompts[:3]):
            engine.submit(gen_item(p, 6, ignore_eos=True), None, sink(i))
        engine.submit(gen_item(prompts[0], 6, temperature=1.0, presence_penalty=float("inf")), None, sink(5))
        for i, p in enumerate(prompts[3:], start=3):
            engine.submit(gen_item(p, 6, ignore_eos=True), None, sink(i))
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    assert isinstance(results[5], SamplingError), results[5]
    assert results[:5] == want, "the other rows decode exactly as alone"
    assert engine.stats["failed"] == 1


@pytest.mark.parametrize(
    "poison",
    [
        {"temperature": 1e-40},
        {"temperature": 1e-40, "top_k": 3},
        {"temperature": 0.5, "repetition_penalty": 1e-45},
        {"temperature": 5e-324, "top_p": 5e-324, "min_p": 1.0},
    ],
)
def test_poison_sampling_settings_are_served_not_500(served, poison):
    """Defect put back (temperature 1e-40 overflowing to NaN): 500 internal_error."""
    reply = ask(served, chat(served[0], **poison))
    assert reply.status == 200, (reply.status, reply.body, reply.exception)
    assert reply.body["choices"][0]["finish_reason"] in ("stop", "length")


# --------------------------------------------------------------------------------------------
# 2. chat_template_kwargs allow-list; undecodable text refused before any work


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chat_template": "{% for m in messages %}INJECTED {{ m['content'] }}{% endfor %}"},
        {"chat_template": "{{ 'x' * 10**10 }}"},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"documents": [{"text": "d"}]},
        {"messages": [{"role": "user", "content": "other"}]},
        {"some_unknown_variable": "x"},
        {"enable_thinking": "yes"},
        {"add_generation_prompt": False},
    ],
)
def test_template_overrides_are_refused(served, kwargs):
    """Defect put back (a deny-list of 5 names): the caller's own Jinja template is rendered."""
    reply = ask(served, chat(served[0], chat_template_kwargs=kwargs))
    assert reply.status == 400, (reply.status, reply.body)
    assert reply.body["error"]["param"].startswith("chat_template_kwargs")


def test_documented_template_switches_are_served(served):
    assert set(TEMPLATE_KWARGS) == {"enable_thinking", "add_generation_prompt"}
    for kw in ({"enable_thinking": False}, {"enable_thinking": True}, {"add_generation_prompt": True}):
        reply = ask(served, chat(served[0], chat_template_kwargs=kw))
        assert reply.status == 200, (kw, reply.body)


@pytest.mark.parametrize(
    "where",
    ["user", "content", "key", "stop", "model", "group", "part"],
)
def test_lone_surrogates_get_400_before_any_work(served, where):
    """Defect put back (no check of the parsed text): 500 when the body is encoded."""
    core = served[0]
    body = chat(core)
    bad = "a\ud800b"
    if where == "user":
        body["user"] = bad
    elif where == "content":
        body["messages"][0]["content"] = bad
    elif where == "key":
        body["metadata"] = {bad: 1}
    elif where == "stop":
        body["stop"] = [bad]
    elif where == "model":
        body["model"] = bad
    elif where == "group":
        body["personalization"] = {"group_id": bad}
    else:
        body["messages"][0]["content"] = [{"type": "text", "text": bad}]
    before = core.engine.stats["prefills"]
    reply = ask(served, json.dumps(body).encode())  # json.dumps escapes it as \ud800, valid JSON
    assert (reply.status, reply.body["error"]["code"]) == (400, "invalid_text"), reply.body
    assert core.engine.stats["prefills"] == before, "refused before any work"
    with pytest.raises(ApiError):
        decode_body(b'{"model": "m", "user": "\\udfff"}')
    assert ask(served, b'{"model": "\xff\xfe"}').status == 400  # not UTF-8 at all


# --------------------------------------------------------------------------------------------
# 3. No response field tells whether a user is in the run (minimal detail)


def _anonymous(pers: dict | None) -> dict | None:
    """The personalization with the echoed `user` (the caller's own value) blanked."""
    return None if pers is None else {**pers, "user": "<user>" if pers.get("user") else None}


def _public_fields(reply) -> dict:
    """Every field of an answer except the generated content, the per-response ids/times and
    the caller's own echoed `user`."""
    if reply.body is not None:
        b = reply.body
        return {
            "status": reply.status,
            "headers": reply.headers,
            "object": b["object"],
            "model": b["model"],
            "system_fingerprint": b["system_fingerprint"],
            "personalization": _anonymous(b["personalization"]),
            "prompt_tokens": b["usage"]["prompt_tokens"],
            "keys": sorted(b),
        }
    first = reply.chunks[0]
    return {
        "status": reply.status,
        "headers": reply.headers,
        "chunk_keys": sorted(first),
        "system_fingerprint": {c.get("system_fingerprint") for c in reply.chunks},
        # Every distinct value over the chunks (how many chunks there are is the generated content's).
        "personalization": sorted(
            {json.dumps(_anonymous(c.get("personalization")), sort_keys=True) for c in reply.chunks}
        ),
    }


@pytest.mark.parametrize("stream", [False, True])
def test_no_field_differs_by_membership(served, stream):
    """Defect put back (fingerprint `<run>@…` for members, `base@…` otherwise): it differs."""
    core = served[0]
    assert core.cfg.personalization_detail == "minimal"
    member = members(core)[0]
    outsider = "someone-not-in-the-run"
    assert outsider not in core.registry.current.user_groups
    got = [
        _public_fields(ask(served, chat(core, user=u, stream=stream, temperature=0)))
        for u in (member, outsider)
    ]
    assert got[0] == got[1]


# --------------------------------------------------------------------------------------------
# 4. Health covers the engine


def test_a_dead_engine_fails_health_and_waiting_requests_get_503_at_once(served, monkeypatch):
    """Defect put back (health = a device probe; the loop's admission outside its try): health
    passes and the request waits for the 408."""
    core = served[0]
    ids = core.tok("hi", add_special_tokens=False).input_ids
    engine = Engine(core.model, core.tok, core.eos_ids)
    got: list = []
    done = threading.Event()

    def sink(items):
        got.extend(items)
        done.set()

    def broken_take():
        raise RuntimeError("the loop breaks outside a step")

    monkeypatch.setattr(engine, "_take", broken_take)
    t0 = time.monotonic()
    engine.submit(gen_item(ids, 4), None, sink)
    assert done.wait(10), "a waiting request is told at once"
    assert time.monotonic() - t0 < 5 and isinstance(got[0], EngineDeadError)
    with pytest.raises(EngineDeadError):
        engine.check(stall_s=60)
    with pytest.raises(EngineDeadError):
        engine.submit(gen_item(ids, 4), None, sink)  # new requests are refused at once
    assert engine.state()["alive"] is False
    # The replica's health check is the engine's: swap the dead engine in.
    live = core.engine
    monkeypatch.setattr(core, "engine", engine)
    with pytest.raises(EngineDeadError):
        core.check_health()
    assert core.status() == "unavailable"
    reply = ask(served, chat(core))
    assert (reply.status, reply.body["error"]["code"]) == (503, "engine_unavailable"), reply.body
    monkeypatch.setattr(core, "engine", live)
    core.check_health()


def test_a_stalled_engine_fails_health(served, monkeypatch):
    """Defect put back (no progress clock): a wedged step leaves the replica healthy."""
    core = served[0]
    engine = Engine(core.model, core.tok, core.eos_ids)
    release = threading.Event()
    real = engine._prefill

    def wedged(new):
        release.wait(30)
        real(new)

    monkeypatch.setattr(engine, "_prefill", wedged)
    ids = core.tok("hi", add_special_tokens=False).input_ids
    finished = threading.Event()
    try:
        engine.check(stall_s=1.0)  # idle: healthy
        engine.submit(gen_item(ids, 2), None, lambda items: items[-1].finish_reason and finished.set())
        time.sleep(2.0)
        with pytest.raises(EngineDeadError, match="no decode step"):
            engine.check(stall_s=1.0)
        release.set()
        assert finished.wait(30)
        for _ in range(100):  # the step that finished it ends: healthy again
            if engine.counts() == {"running": 0, "waiting": 0} and not engine._stepping:
                break
            time.sleep(0.05)
        engine.check(stall_s=1.0)
    finally:
        release.set()
        engine.stop()


# --------------------------------------------------------------------------------------------
# 5. Run switches retried until served; /status says which run is served


def test_a_switch_to_a_run_not_yet_published_is_retried_until_served(served):
    """Defect put back (the poller skips pinned runs once any run is loaded): stale forever."""
    core0, store, src, _ = served
    core = ModelServer(core0.cfg.model_copy(update={"run": "latest"}), store)
    core.start_polling()
    try:
        assert core.registry.current.run_id == RUN
        core.switch_run("tiny-run-later")  # not in the store yet: the old run keeps serving
        status = core.health()
        assert status["run_id"] == RUN and status["on_target"] is False
        copy_run(src, store, RUN, "tiny-run-later")
        deadline = time.monotonic() + 10 * core.cfg.refresh_interval_s + 5
        while core.registry.current.run_id != "tiny-run-later" and time.monotonic() < deadline:
            time.sleep(0.05)
        status = core.health()
        assert (status["run_id"], status["requested_run"], status["on_target"]) == (
            "tiny-run-later",
            "tiny-run-later",
            True,
        )
        # Back to following `latest`: the pointer's run is served again within an interval.
        core.switch_run("latest")
        assert core.registry.current.run_id == RUN and core.health()["on_target"]
    finally:
        core.stop_polling()


# --------------------------------------------------------------------------------------------
# 6. Host-side group cache bounded; alpha/beta finite


def test_host_group_cache_is_bounded_by_edit_cache_size(served):
    """Defect put back (PublishedRun keeps every group it loaded): 3 groups held for 2 rows."""
    core = served[0]
    run = core.registry.current
    for gid in sorted(run.group_ids):
        run.published.group_edit(gid)
    assert len(run.group_ids) > core.cfg.edit_cache_size
    assert len(run.published._groups) == core.cfg.edit_cache_size


def test_runs_with_non_finite_edit_strengths_are_refused(served, tmp_path):
    """Defect put back (alpha/beta unchecked): an alpha of inf is served (every edited row NaN)."""
    from chameleon.data.artifacts import ArtifactError
    from chameleon.serving.registry import load_run

    core, _, src, _ = served
    store = LocalStore(tmp_path / "store")
    for field in ("alpha", "beta"):
        run_id = f"bad-{field}"
        copy_run(
            src, store, RUN, run_id, manifest_edit=lambda m, f=field: m["edit"].__setitem__(f, float("inf"))
        )
        with pytest.raises(ArtifactError, match="non-finite"):
            load_run(store, run_id, core.fingerprint, core.num_layers, None)


def test_chat_request_model_refuses_unknown_template_kwargs_directly():
    req = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tools": []}}
    )
    with pytest.raises(ApiError) as err:
        req.template_kwargs()
    assert err.value.status == 400


# --------------------------------------------------------------------------------------------
# 9. The API fuzz: hypothesis over request bodies, end to end through the app's steps


def weighted(*options):
    """One of the (weight, strategy) options, drawn in proportion to the weights."""
    from hypothesis import strategies as st

    table = [strategy for weight, strategy in options for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def _texts():
    from hypothesis import strategies as st

    surrogate = st.sampled_from(["\ud800", "\udc00", "\udfff"])
    return weighted(
        (6, st.text(st.characters(codec="utf-8"), max_size=24)),
        (2, st.sampled_from(["", " ", "hello", "a" * 300, "<|im_start|>", "{{ 7*7 }}", "\x00", "\u202e"])),
        (1, st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), surrogate, st.text(max_size=4))),
    )


def request_bodies(model: str, groups: list[str], users: list[str]):
    """JSON request bodies: mostly plausible, with edge values and junk in any field."""
    from hypothesis import strategies as st

    text = _texts()
    junk = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | text,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
        max_leaves=6,
    )
    floats = weighted(
        (3, st.floats(0, 1)),
        (3, st.sampled_from([0.0, 1e-40, 5e-324, 1e-300, 1e-45, 1e-2, 1.0, 2.0, -0.0])),
        (1, st.floats()),
    )
    ints = st.one_of(st.integers(0, 8), st.sampled_from([-1, 2**63, -(2**63) - 1, 10**40]), st.integers())
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "user", "user", "system", "assistant", "developer", "tool"]),
            "content": st.one_of(
                text,
                st.lists(
                    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": text}),
                    max_size=2,
                ),
            ),
        }
    )
    template_keys = st.sampled_from(
        ["enable_thinking", "add_generation_prompt", "chat_template", "tools", "documents"]
    )
    optional = {
        "temperature": floats,
        "top_p": floats,
        "top_k": ints,
        "min_p": floats,
        "repetition_penalty": floats,
        "frequency_penalty": floats,
        "presence_penalty": floats,
        "max_tokens": ints,
        "max_completion_tokens": ints,
        "seed": ints,
        "stop": st.one_of(text, st.lists(text, max_size=5)),
        "stop_token_ids": st.lists(ints, max_size=4),
        "min_tokens": ints,
        "n": ints,
        "stream": st.booleans(),
        "stream_options": st.dictionaries(st.sampled_from(["include_usage", "x"]), junk, max_size=2),
        "user": st.one_of(st.sampled_from(users), text),
        "safety_identifier": text,
        "personalization": st.one_of(
            st.fixed_dictionaries(
                {}, optional={"group_id": st.one_of(st.sampled_from(groups), text), "off": st.booleans()}
            ),
            junk,
        ),
        "chat_template_kwargs": st.one_of(
            st.dictionaries(st.one_of(template_keys, text), junk, max_size=2), junk
        ),
        "return_token_ids": st.booleans(),
        "ignore_eos": st.booleans(),
        "logit_bias": junk,
        "tools": junk,
        "response_format": junk,
        "logprobs": junk,
        "metadata": junk,
    }
    models = weighted((6, st.just(model)), (2, st.sampled_from([f"{model}:{g}" for g in groups])), (1, text))
    # A few fields per request (each drawn plausible, at an edge, or junk), so that many requests
    # pass validation and reach the sampler.
    sampling = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty"]
    keys = sorted(optional) + sampling * 6  # the sampler's fields come up more often
    extra = st.lists(st.sampled_from(keys), max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: optional[k] for k in keys})
    )
    chat = st.builds(
        lambda m, msgs, more: {"model": m, "messages": msgs, **more},
        models,
        weighted((8, st.lists(message, min_size=1, max_size=3)), (1, junk)),
        extra,
    )
    completion = st.builds(
        lambda m, p, more: {"model": m, "prompt": p, **more},
        models,
        weighted((6, text), (2, st.lists(text, max_size=2)), (1, junk)),
        extra,
    )
    return weighted(
        (5, st.tuples(st.just("chat"), chat.map(lambda b: json.dumps(b).encode()))),
        (4, st.tuples(st.just("completion"), completion.map(lambda b: json.dumps(b).encode()))),
        (1, st.tuples(st.sampled_from(["chat", "completion"]), st.binary(max_size=40))),
    )


def run_fuzz(served, max_examples: int) -> dict:
    """Hypothesis over request bodies; fails on the first answer >= 500 (or one that cannot be
    encoded). Returns counts by status."""
    from hypothesis import HealthCheck, Phase, given, settings

    core = served[0]
    run = core.registry.current
    counts: dict[int, int] = {}

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # report the first failure, no shrinking
        suppress_health_check=list(HealthCheck),
    )
    @given(request_bodies(core.cfg.model_name, sorted(run.group_ids), members(core)[:3]))
    def no_5xx(case):
        kind, body = case
        reply = ask(served, body, kind)
        counts[reply.status] = counts.get(reply.status, 0) + 1
        assert reply.status < 500, (reply.status, reply.body, repr(reply.exception), body[:300])
        if reply.status == 200:
            assert reply.raw and (reply.body is not None or reply.chunks)

    no_5xx()
    return counts


def test_api_fuzz_finds_no_5xx(served):
    counts = run_fuzz(served, max_examples=300)
    print("fuzz statuses:", dict(sorted(counts.items())))
    assert sum(counts.values()) == 300
    assert counts.get(200, 0) >= 20, f"the fuzz reaches generation often enough: {counts}"


def _unguarded_pick_tokens(logits, seqs):
    """The sampler before issue 19: no temperature floor, nothing checked before the draw, and
    an exception fails the whole step."""
    out = torch.argmax(logits, dim=-1)
    for j, s in enumerate(seqs):
        it = s.item.params
        if it.plain:
            continue
        x = logits[j] / it.temperature if it.temperature > 0 else logits[j]
        if it.temperature <= 0:
            out[j] = torch.argmax(x)
            continue
        if 0 < it.top_k < x.shape[0]:
            x = x.masked_fill(x < torch.topk(x, it.top_k).values[-1], -float("inf"))
        out[j] = torch.multinomial(torch.softmax(x, dim=-1), 1, generator=s.generator)[0]
    return out, {}


@pytest.mark.parametrize("defect", ["temperature", "surrogate"])
def test_api_fuzz_finds_the_defects_when_they_are_put_back(served, monkeypatch, defect):
    import chameleon.serving.engine as engine_module
    import chameleon.serving.protocol as protocol_module

    if defect == "temperature":
        monkeypatch.setattr(engine_module, "pick_tokens", _unguarded_pick_tokens)
    else:
        monkeypatch.setattr(protocol_module, "check_text", lambda data: None)
    with pytest.raises(AssertionError) as found:
        run_fuzz(served, max_examples=500)
    assert "500" in str(found.value), str(found.value)[:500]
