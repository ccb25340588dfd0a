"""The continuous-batching engine: greedy output identical to offline generation for every edit
form, with rows joining and leaving a running batch; sampling fields; aborts; text streaming."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from reference_decoder import ReferenceDecoder, gen_item
from tiny_models import embedded_tokenizer, tiny_llama

from chameleon.config import EditConfig
from chameleon.core.edit import Edit
from chameleon.core.generation import bank_for_edits, chat_prompt, generate_answers
from chameleon.serving.decoder import TextStream, default_eos_ids
from chameleon.serving.engine import Engine
from chameleon.serving.metrics import ServingMetrics

LAYERS = [1, 2]
QUESTIONS = [
    "hello there",
    "write a tweet about rain in the city at night",
    "what is two plus two",
    "good morning!!",
    "x",
    "tell me a long story about a dragon who loves tea and biscuits",
]


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # Weights scaled up: a random model at its init scale repeats one token, which would make
    # token identity a weak check. One torch thread: much faster on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = tiny_llama(tok, seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    yield m
    torch.set_num_threads(threads)


def make_edit(seed: int, form: str, d: int = 64) -> Edit:
    g = torch.Generator().manual_seed(seed)
    n = len(LAYERS)
    P = torch.linalg.qr(torch.randn(n, d, 2, generator=g))[0].transpose(1, 2)
    N = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    mu = 0.1 * torch.randn(n, d, generator=g)
    steer = None
    if form != "projection":
        steer = 30.0 * torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return Edit(list(LAYERS), P, N, mu, steer=steer, renorm=form == "norm_preserving")


class Collector:
    """Gathers one request's deltas on the engine thread."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text = ""
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, items) -> None:
        for d in items:
            if isinstance(d, BaseException):
                self.error = d
                self.done.set()
                return
            self.ids += d.token_ids
            self.text += d.text
            if d.finish_reason:
                self.finish = d.finish_reason
                self.done.set()


def offline_ids(model, tok, bank, row: int, question: str, n: int) -> list[int]:
    enc = tok([chat_prompt(tok, question)], return_tensors="pt", add_special_tokens=False)
    greedy = dict(max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        if row:
            with bank.apply(model, [row]):
                out = model.generate(**enc, **greedy, pad_token_id=tok.pad_token_id)
        else:
            out = model.generate(**enc, **greedy, pad_token_id=tok.pad_token_id)
    return out[0, enc.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("form", ["projection", "additive", "norm_preserving"])
def test_greedy_engine_equals_offline_generation_with_rows_joining_and_leaving(model, tok, form):
    edits = [make_edit(1, form), make_edit(2, form)]
    cfg = EditConfig(form=form, alpha=4.0 if form == "projection" else 1.0)
    bank, rows = bank_for_edits(model, edits, cfg)
    # Per question: which edit (None = edit off), and a budget so that rows leave at different steps.
    plan = [(0, 10), (None, 4), (1, 12), (0, 3), (1, 6), (None, 9)]
    eos = default_eos_ids(model, tok)
    engine = Engine(model, tok, eos, max_running=4)  # fewer places than requests: some wait
    got: list[Collector] = []
    try:
        for k, (q, (e, n)) in enumerate(zip(QUESTIONS, plan, strict=True)):
            ids = tok(chat_prompt(tok, q), add_special_tokens=False).input_ids
            c = Collector()
            engine.submit(gen_item(ids, n, row=0 if e is None else rows[e], ignore_eos=True), bank, c)
            got.append(c)
            if k in (1, 3):  # later ones join a batch that is already decoding
                while len(got[0].ids) < 2 + k:
                    time.sleep(0.005)
        for c in got:
            assert c.done.wait(60) and c.error is None, c.error
    finally:
        engine.stop()
    assert engine.stats["max_batch"] == 4 and engine.stats["prefills"] >= 3
    for q, (e, n), c in zip(QUESTIONS, plan, got, strict=True):
        want = offline_ids(model, tok, bank, 0 if e is None else rows[e], q, n)
        assert c.ids == want, f"{form}: {q!r} (edit {e}) differs from offline generation"
        assert c.finish == "length"
    # The text matches the offline helper's (same edits, its own batching and padding).
    offline = generate_answers(
        model,
        tok,
        QUESTIONS,
        edits=[None if e is None else edits[e] for e, _ in plan],
        edit_cfg=cfg,
        max_new_tokens=12,
        batch_size=3,
    )
    for (_, n), c, want in zip(plan, got, offline, strict=True):
        if n == 12:
            assert c.text.strip() == want
    # The edit mattered: an edited row differs from the same question unedited.
    assert offline_ids(model, tok, bank, 0, QUESTIONS[2], 12) != got[2].ids


def test_reference_decoder_gives_offline_tokens(model, tok):
    """The parity oracle itself: a fixed batch with mixed rows gives offline generation's tokens."""
    bank, rows = bank_for_edits(model, [make_edit(3, "additive")], EditConfig())
    items = [
        gen_item(tok(chat_prompt(tok, q), add_special_tokens=False).input_ids, 8, row=r, ignore_eos=True)
        for q, r in zip(QUESTIONS[:3], (rows[0], 0, rows[0]), strict=True)
    ]
    ref = ReferenceDecoder(model, tok, items, bank).run()
    for it, (_, ids, _) in zip(items, ref, strict=True):
        q = QUESTIONS[items.index(it)]
        assert ids == offline_ids(model, tok, bank, it.row, q, 8)


def test_stream_gathers_chunks_and_abort_frees_the_row(model, tok):
    eos = default_eos_ids(model, tok)
    engine = Engine(model, tok, eos, max_running=8, stream_interval_s=0.05)
    ids = tok(chat_prompt(tok, "hello"), add_special_tokens=False).input_ids

    async def main():
        stream = engine.stream(gen_item(ids, 30, ignore_eos=True), None)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the stream submits its request and waits for the first token
        time.sleep(0.5)  # hold the event loop while the engine decodes several tokens
        chunks = [await first]
        async for chunk in stream:
            chunks.append(chunk)
        # An aborted stream leaves the batch: the engine goes idle.
        agen = engine.stream(gen_item(ids, 1000, ignore_eos=True), None)
        await agen.__anext__()
        await agen.aclose()
        for _ in range(200):
            if engine.counts() == {"running": 0, "waiting": 0}:
                break
            await asyncio.sleep(0.01)
        return chunks

    try:
        chunks = asyncio.run(main())
    finally:
        engine.stop()
    assert len(chunks[0]) == 1, "the first token is sent alone, at once, however many are ready"
    assert sum(len(c) for c in chunks) == 30 and len(chunks) < 30, "later tokens are gathered"
    assert chunks[-1][-1].finish_reason == "length"
    assert engine.counts() == {"running": 0, "waiting": 0}
    assert engine.stats["aborted"] == 1


def test_sampling_fields(model, tok):
    eos = default_eos_ids(model, tok)
    ids = tok(chat_prompt(tok, "hello"), add_special_tokens=False).input_ids

    def run(**kw):
        return ReferenceDecoder(model, tok, [gen_item(ids, 12, ignore_eos=True, **kw)], None, eos).run()[0][1]

    greedy = run()
    # Seeded sampling is reproducible; top_k=1 is greedy whatever the temperature.
    assert run(temperature=1.5, seed=3, top_k=50, min_p=0.01) == run(
        temperature=1.5, seed=3, top_k=50, min_p=0.01
    )
    assert run(temperature=1.5, seed=3, top_k=1) == greedy
    # A huge presence penalty forbids any repeat; repetition penalty changes the answer.
    once = run(presence_penalty=1e4)
    assert len(set(once)) == len(once)
    assert run(repetition_penalty=50.0) != greedy or len(set(greedy)) == len(greedy)
    # stop_token_ids end the sequence on that token (not in the text), min_tokens postpones it.
    stop_tok = greedy[3]
    ((_, out, finish),) = ReferenceDecoder(
        model, tok, [gen_item(ids, 12, stop_token_ids=(stop_tok,))], None, eos
    ).run()
    first = greedy.index(stop_tok)
    assert out == greedy[: first + 1] and finish == "stop"
    seq = ReferenceDecoder(
        model, tok, [gen_item(ids, 12, stop_token_ids=(stop_tok,), min_tokens=first + 2)], None, eos
    )
    ((_, out2, _),) = seq.run()
    assert len(out2) >= first + 2 and stop_tok not in out2[: first + 1]


def test_text_stream_is_incremental_and_holds_back_partial_characters(tok):
    text = "Héllo 🌧️ wörld — stop here, not there"
    ids = tok(text, add_special_tokens=False).input_ids
    s = TextStream(tok)
    parts = [s.push(t, final=i == len(ids) - 1)[0] for i, t in enumerate(ids)]
    assert "".join(parts) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in parts)
    s = TextStream(tok, stop=("stop",))
    out = ""
    for i, t in enumerate(ids):
        piece, hit = s.push(t, final=i == len(ids) - 1)
        out += piece
        if hit:
            break
    assert hit == "stop" and out == text[: text.index("stop")]


def test_engine_records_metrics(model, tok):
    seen: dict[str, list] = {}

    class Rec:
        def __init__(self, name):
            self.name = name

        def observe(self, v, tags=None):
            seen.setdefault(self.name, []).append(v)

        def inc(self, v=1.0, tags=None):
            seen.setdefault(self.name, []).append(v)

        def set(self, v, tags=None):
            seen.setdefault(self.name, []).append(v)

    metrics = ServingMetrics(lambda kind, name, desc, b: Rec(name))
    engine = Engine(model, tok, default_eos_ids(model, tok), metrics=metrics)
    c = Collector()
    ids = tok(chat_prompt(tok, "hi"), add_special_tokens=False).input_ids
    engine.submit(gen_item(ids, 5, ignore_eos=True), None, c)
    assert c.done.wait(30)
    engine.stop()
    for name in (
        "chameleon_time_to_first_token_seconds",
        "chameleon_inter_token_latency_seconds",
        "chameleon_queue_wait_seconds",
        "chameleon_batch_size",
        "chameleon_running_requests",
        "chameleon_generated_tokens",
    ):
        assert seen.get(name), name
    assert sum(seen["chameleon_generated_tokens"]) == 5
    assert len(seen["chameleon_inter_token_latency_seconds"]) == 4


def test_model_name_selects_a_group_and_conflicts_are_refused():
    from chameleon.serving.protocol import ApiError, ChatRequest, split_model

    assert split_model("m:g1", "m") == ("m", "g1")
    assert split_model("m:team:a", "m") == ("m", "team:a")
    assert split_model("other:g1", "m") == ("other:g1", None)

    def req(**kw):
        r = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})
        r.check()
        return r

    r = req()
    r.select_group("g1")
    assert r.personalization.group_id == "g1"
    for kw in ({"personalization": {"group_id": "g2"}}, {"personalization": {"off": True}}):
        with pytest.raises(ApiError) as err:
            req(**kw).select_group("g1")
        assert err.value.status == 400
    assert req(safety_identifier="u1").user == "u1"
    assert req(safety_identifier="u1", user="u2").user == "u2"


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(model, tok):
    bank, rows = bank_for_edits(model, [make_edit(4, "additive")], EditConfig())
    engine = Engine(model, tok, default_eos_ids(model, tok))
    ids = tok(chat_prompt(tok, "hi"), add_special_tokens=False).input_ids
    try:
        bad = Collector()
        engine.submit(gen_item(ids, 4, row=bank.n_rows + 5), bank, bad)  # no such bank row
        assert bad.done.wait(30) and bad.error is not None and "decode step failed" in str(bad.error)
        good = Collector()
        engine.submit(gen_item(ids, 4, row=rows[0], ignore_eos=True), bank, good)
        assert good.done.wait(30) and good.error is None and len(good.ids) == 4
    finally:
        engine.stop()


def test_a_burst_of_long_prompts_is_prefilled_within_the_token_budget(model, tok):
    """Running streams keep decoding while 10 long prompts arrive; each prefill forward stays
    within max_prefill_tokens and every answer is exact. Defect put back (no budget): the burst
    is prefilled in one forward of 10 × its longest prompt."""
    eos = default_eos_ids(model, tok)
    budget = 300
    long_ids = [tok(("rain and wind " * 40) + str(i), add_special_tokens=False).input_ids for i in range(10)]
    assert 100 < max(map(len, long_ids)) <= budget
    short_ids = [tok(chat_prompt(tok, q), add_special_tokens=False).input_ids for q in QUESTIONS[:2]]
    engine = Engine(model, tok, eos, max_running=16, max_prefill_tokens=budget)
    running = [Collector() for _ in short_ids]
    burst = [Collector() for _ in long_ids]
    try:
        for ids, c in zip(short_ids, running, strict=True):
            engine.submit(gen_item(ids, 24, ignore_eos=True), None, c)
        while len(running[0].ids) < 2:
            time.sleep(0.005)
        for ids, c in zip(long_ids, burst, strict=True):
            engine.submit(gen_item(ids, 3, ignore_eos=True), None, c)
        for c in (*running, *burst):
            assert c.done.wait(120) and c.error is None, c.error
    finally:
        engine.stop()
    assert engine.stats["max_prefill_tokens_seen"] <= budget, engine.stats
    for ids, c, n in [
        *zip(short_ids, running, [24, 24], strict=True),
        *zip(long_ids, burst, [3] * 10, strict=True),
    ]:
        want = ReferenceDecoder(model, tok, [gen_item(ids, n, ignore_eos=True)], None, eos).run()[0][1]
        assert c.ids == want


def test_base_rows_never_wait_for_a_layout_switch(model, tok):
    """A request for another bank layout waits for the running layout's rows to finish; a base
    request behind it starts at once. Defect put back (the switch blocks the whole queue): the
    base request waits for the long edited one."""
    eos = default_eos_ids(model, tok)
    bank_a, rows_a = bank_for_edits(model, [make_edit(5, "additive")], EditConfig())
    bank_b, rows_b = bank_for_edits(model, [make_edit(6, "additive")], EditConfig())
    ids = [tok(chat_prompt(tok, q), add_special_tokens=False).input_ids for q in QUESTIONS[:3]]
    engine = Engine(model, tok, eos, max_running=8)
    a, b, base = Collector(), Collector(), Collector()
    try:
        engine.submit(gen_item(ids[0], 60, row=rows_a[0], ignore_eos=True), bank_a, a)
        while len(a.ids) < 2:
            time.sleep(0.005)
        engine.submit(gen_item(ids[1], 4, row=rows_b[0], ignore_eos=True), bank_b, b)
        engine.submit(gen_item(ids[2], 3, ignore_eos=True), None, base)
        assert base.done.wait(60) and base.error is None
        assert not a.done.is_set(), "the base request finished while the old layout still ran"
        for c in (a, b):
            assert c.done.wait(120) and c.error is None
    finally:
        engine.stop()
    assert b.ids == offline_ids(model, tok, bank_b, rows_b[0], QUESTIONS[1], 4)
    assert base.ids == offline_ids(model, tok, None, 0, QUESTIONS[2], 3)
    assert engine.stats["run_switches"] == 2
