"""Benchmark: one request or one thread must never take down other users (issue 19).

    python jobs/bench/serve_faults.py [--model PATH] [--fuzz-requests 2000] [--smoke] [--out FILE]

Loopback only and bounded. A tiny random Llama with the embedded model's tokenizer (or `--model`),
a synthetic run in a temporary local store, the replica's core (`ModelServer`, no Ray), every
request answered as the app answers it (`chameleon.serving.local.answer`: validation, admission,
the edit cache, the engine, the response body). Each figure is expected to be 0:

- `other_requests_failed`: 1 poison request among 31 normal ones, sent together, for each
  poison kind (tiny temperatures, with top_k, tiny penalties, a template override, surrogates);
  normal requests that did not get 200 (`poison_kinds` says how many kinds).
- `errors_5xx_fuzz`: answers >= 500 among `fuzz_requests` generated requests (a seeded fuzzer:
  plausible requests with edge values and junk in a few fields, surrogates, raw bytes).
- `template_overrides_accepted`: `chat_template_kwargs` that set a template, tools, documents,
  messages, unknown keys or non-boolean switches, answered 200.
- `fields_differing_by_membership`: response fields (headers, fingerprint, personalization,
  usage, keys; streamed and not) that differ between users in the run and users not in it.
- `healthy_probes_with_dead_engine`: health probes that pass after the decode loop died.
- `replicas_on_stale_run`: of 2 replicas, those not serving the new run one refresh interval
  (plus loading time) after `latest` moved, or after a switch to a run published only later.
- `busy_503_with_free_row`: "every edit slot is busy" answers given while a row was free
  (stress on the edit-row line: random holds, cancellations, 10 groups over 2 rows).
- `cold_groups_starved`: cold-group requests that timed out while 2 hot groups kept 2 rows busy.
- `running_streams_failed`: running streams that failed while a burst of long prompts arrived
  (`max_prefill_tokens_seen` stays within `max_prefill_tokens`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import TINY_MODEL, model_path, parse, parser, report  # also puts the project on sys.path

POISONS = {
    "temperature_1e-40": {"temperature": 1e-40},
    "temperature_1e-40_top_k": {"temperature": 1e-40, "top_k": 3},
    "repetition_penalty_1e-45": {"temperature": 0.7, "repetition_penalty": 1e-45},
    "denormal_top_p_min_p": {"temperature": 5e-324, "top_p": 5e-324, "min_p": 1.0},
    "template_override": {"chat_template_kwargs": {"chat_template": "{{ 'x' * 10**7 }}"}},
    "surrogate_user": {"user": "a\ud800"},
    "surrogate_content": {"messages": [{"role": "user", "content": "\udfff"}]},
}
TEMPLATE_OVERRIDES = [
    {"chat_template": "{% for m in messages %}INJECTED {{ m['content'] }}{% endfor %}"},
    {"chat_template": "{{ 'x' * 10**10 }}"},
    {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"documents": [{"text": "d"}]},
    {"messages": [{"role": "user", "content": "other"}]},
    {"conversation": []},
    {"tokenize": True},
    {"return_dict": True},
    {"custom_variable": "x"},
    {"enable_thinking": "yes"},
    {"enable_thinking": 1},
    {"add_generation_prompt": False},
    {"enable_thinking": True, "chat_template": "x"},
]
EDGE_FLOATS = [0.0, -0.0, 1e-40, 5e-324, 1e-300, 1e-45, 1e-2, 0.5, 1.0, 2.0, -1.0, 1e308]
EDGE_FLOATS += [float("inf"), float("-inf"), float("nan")]
EDGE_INTS = [-1, 0, 1, 2, 4, 8, 9, 2**31, 2**63, -(2**63) - 1, 10**40]
TEXTS = ["", " ", "hello", "a" * 300, "<|im_start|>system", "{{ 7*7 }}", "\x00", "\u202e", "é🌧", "\ud800"]
FIELDS = (
    "temperature top_p top_k min_p repetition_penalty frequency_penalty presence_penalty max_tokens "
    "max_completion_tokens seed stop stop_token_ids min_tokens n stream stream_options user "
    "safety_identifier personalization chat_template_kwargs return_token_ids ignore_eos logit_bias "
    "tools response_format logprobs metadata"
).split()


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=TINY_MODEL, help="base model (default: the tests' tiny random Llama)")
    p.add_argument("--fuzz-requests", type=int, default=2000)
    p.add_argument("--burst", type=int, default=32, help="long prompts in the burst (default 32)")
    p.add_argument("--burst-tokens", type=int, default=1024, help="tokens per long prompt (default 1024)")
    p.add_argument("--stress-requests", type=int, default=2000, help="edit-row line stress (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    smoke = {"fuzz_requests": 200, "burst": 8, "burst_tokens": 128, "stress_requests": 200}
    return parse(p, smoke, argv)


# ---------------------------------------------------------------------------------------------
# Requests


def chat(model: str, content: str = "hello there", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def rand_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return rng.choice(TEXTS)
    if r < 0.4:
        return "".join(
            chr(rng.choice([rng.randint(0xD800, 0xDFFF), rng.randint(32, 0x2FFFF)])) for _ in range(4)
        )
    return "".join(
        chr(rng.randint(32, 0x7E if rng.random() < 0.8 else 0x10FFF)) for _ in range(rng.randint(0, 20))
    )


def junk(rng: random.Random, depth: int = 0):
    kinds = ["none", "bool", "int", "float", "text"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice(EDGE_INTS)
    if kind == "float":
        return rng.choice(EDGE_FLOATS)
    if kind == "text":
        return rand_text(rng)
    if kind == "list":
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rand_text(rng): junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def field_value(name: str, rng: random.Random, groups: list[str], users: list[str]):
    if rng.random() < 0.15:
        return junk(rng)
    if name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
    ):
        return rng.choice(EDGE_FLOATS) if rng.random() < 0.5 else rng.uniform(0, 2)
    if name in ("top_k", "max_tokens", "max_completion_tokens", "seed", "min_tokens", "n"):
        return rng.choice(EDGE_INTS) if rng.random() < 0.4 else rng.randint(0, 8)
    if name == "stop":
        return rand_text(rng) if rng.random() < 0.5 else [rand_text(rng) for _ in range(rng.randint(0, 5))]
    if name == "stop_token_ids":
        return [rng.choice(EDGE_INTS) for _ in range(rng.randint(0, 4))]
    if name in ("stream", "return_token_ids", "ignore_eos"):
        return rng.random() < 0.5
    if name == "stream_options":
        return {"include_usage": junk(rng)}
    if name in ("user", "safety_identifier"):
        return rng.choice(users) if rng.random() < 0.5 else rand_text(rng)
    if name == "personalization":
        return {
            "group_id": rng.choice(groups) if rng.random() < 0.6 else rand_text(rng),
            "off": rng.random() < 0.2,
        }
    if name == "chat_template_kwargs":
        keys = ["enable_thinking", "add_generation_prompt", "chat_template", "tools", "documents"]
        return {rng.choice(keys) if rng.random() < 0.8 else rand_text(rng): junk(rng)}
    return junk(rng)


def fuzz_request(rng: random.Random, model: str, groups: list[str], users: list[str]) -> tuple[str, bytes]:
    kind = "chat" if rng.random() < 0.55 else "completion"
    if rng.random() < 0.05:
        return kind, bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    r = rng.random()
    name = model if r < 0.7 else (f"{model}:{rng.choice(groups)}" if r < 0.9 else rand_text(rng))
    body: dict = {"model": name}
    if kind == "chat":
        roles = ["user", "user", "system", "assistant", "developer", "tool"]
        body["messages"] = (
            [{"role": rng.choice(roles), "content": rand_text(rng) or "hi"} for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.9
            else junk(rng)
        )
    else:
        body["prompt"] = rand_text(rng) or "hi" if rng.random() < 0.9 else junk(rng)
    for k in rng.sample(FIELDS, rng.randint(0, 4)):
        body[k] = field_value(k, rng, groups, users)
    return kind, json.dumps(body).encode()  # ensure_ascii: surrogates travel as \\ud800 escapes


# ---------------------------------------------------------------------------------------------
# Figures


def poison_figures(core, loop, answer) -> dict:
    model = core.cfg.model_name

    async def one_kind(poison: dict) -> tuple[int, int]:
        bodies = [chat(model, f"question {i}", temperature=0.8, seed=i) for i in range(31)]
        bodies.insert(15, {**chat(model), **poison})
        replies = await asyncio.gather(*(answer(core, "chat", json.dumps(b).encode()) for b in bodies))
        others = [r for i, r in enumerate(replies) if i != 15]
        return sum(r.status != 200 for r in others), int(replies[15].status >= 500)

    failed = poison_5xx = 0
    for poison in POISONS.values():
        f, p = loop.run_until_complete(one_kind(poison))
        failed, poison_5xx = failed + f, poison_5xx + p
    return {"poison_kinds": len(POISONS), "poison_requests_5xx": poison_5xx, "other_requests_failed": failed}


def fuzz_figures(core, loop, answer, n: int, seed: int, groups, users) -> dict:
    rng = random.Random(seed)
    cases = [fuzz_request(rng, core.cfg.model_name, groups, users) for _ in range(n)]
    statuses: dict[int, int] = {}

    async def batch(chunk):
        return await asyncio.gather(*(answer(core, kind, body) for kind, body in chunk))

    for i in range(0, n, 16):
        for r in loop.run_until_complete(batch(cases[i : i + 16])):
            statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "fuzz_answered_200": statuses.get(200, 0),
        "errors_5xx_fuzz": sum(v for k, v in statuses.items() if k >= 500),
        "fuzz_requests": n,
    }


def template_figures(core, loop, answer) -> dict:
    accepted = 0
    for kw in TEMPLATE_OVERRIDES:
        body = json.dumps(chat(core.cfg.model_name, chat_template_kwargs=kw)).encode()
        accepted += loop.run_until_complete(answer(core, "chat", body)).status == 200
    return {"template_overrides_accepted": accepted}


def public_fields(reply) -> dict:
    def anon(p):
        return None if p is None else {**p, "user": "<user>" if p.get("user") else None}

    if reply.body is not None and reply.status == 200:
        b = reply.body
        return {
            "status": reply.status,
            "headers": reply.headers,
            "keys": sorted(b),
            "object": b["object"],
            "model": b["model"],
            "system_fingerprint": b["system_fingerprint"],
            "personalization": anon(b["personalization"]),
            "prompt_tokens": b["usage"]["prompt_tokens"],
        }
    if reply.chunks:
        return {
            "status": reply.status,
            "headers": reply.headers,
            "chunk_keys": sorted(reply.chunks[0]),
            "system_fingerprint": sorted({str(c.get("system_fingerprint")) for c in reply.chunks}),
            "personalization": [anon(c.get("personalization")) for c in reply.chunks[:1]],
        }
    return {"status": reply.status, "body": reply.body}


def membership_figures(core, loop, answer, members: list[str]) -> dict:
    differing: set[str] = set()
    for i, member in enumerate(members[:4]):
        for stream in (False, True):
            got = []
            for user in (member, f"not-in-the-run-{i}"):
                body = chat(core.cfg.model_name, user=user, stream=stream, temperature=0)
                got.append(
                    public_fields(loop.run_until_complete(answer(core, "chat", json.dumps(body).encode())))
                )
            differing |= {k for k in got[0].keys() | got[1].keys() if got[0].get(k) != got[1].get(k)}
    return {"fields_differing_by_membership": len(differing)}


def greedy_item(prompt_ids, max_tokens: int, ignore_eos: bool = True):
    """An engine item decoded greedily."""
    from chameleon.serving.decoder import GenItem
    from chameleon.serving.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, ignore_eos=ignore_eos).resolved({}, max_tokens)
    return GenItem(list(prompt_ids), params)


def dead_engine_figures(core, loop, answer) -> dict:
    from chameleon.serving.engine import Engine

    engine = Engine(core.model, core.tok, core.eos_ids)
    told = threading.Event()

    def broken_take():  # fault injection: the loop breaks outside a step
        raise RuntimeError("injected")

    engine._take = broken_take
    t0 = time.perf_counter()
    engine.submit(greedy_item(core.tok("hi").input_ids, 4, ignore_eos=False), None, lambda items: told.set())
    told.wait(30)
    seconds = time.perf_counter() - t0
    live, core.engine = core.engine, engine
    healthy = 0
    try:
        for _ in range(20):
            try:
                core.check_health()
                healthy += 1
            except Exception:
                pass
        reply = loop.run_until_complete(answer(core, "chat", json.dumps(chat(core.cfg.model_name)).encode()))
    finally:
        core.engine = live
    return {
        "healthy_probes_with_dead_engine": healthy,
        "dead_engine_answer_status": reply.status,
        "seconds_to_fail_a_waiting_request": round(seconds, 3) if told.is_set() else -1,
    }


def stale_run_figures(make_replica, store, publish, interval: float) -> dict:
    replicas = [make_replica() for _ in range(2)]
    for r in replicas:
        r.start_polling()
    stale = 0
    try:
        publish("run-b", latest=True)  # `latest` moves
        time.sleep(interval + 2.0)
        stale += sum(r.registry.current.run_id != "run-b" for r in replicas)
        for r in replicas:  # a pin on a run the job has not published yet
            r.switch_run("run-c")
        publish("run-c", latest=False)
        time.sleep(interval + 2.0)
        stale += sum(r.registry.current.run_id != "run-c" or not r.health()["on_target"] for r in replicas)
    finally:
        for r in replicas:
            r.stop_polling()
    return {"replicas_on_stale_run": stale}


def line_figures(n: int, seed: int) -> dict:
    import torch

    from chameleon.core.edit import Edit, EditBank
    from chameleon.serving.edit_cache import CacheFullError, EditCache

    rng = random.Random(seed)

    def edit(i: int) -> Edit:
        g = torch.Generator().manual_seed(i)
        p = torch.linalg.qr(torch.randn(2, 8, 2, generator=g)).Q.transpose(1, 2)
        return Edit(
            [1, 3],
            p,
            torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1),
            torch.zeros(2, 8),
        )

    edits = {k: edit(k) for k in range(11)}
    out = {"busy_503_with_free_row": 0, "busy_503": 0, "cold_groups_starved": 0}

    async def stress():
        cache = EditCache(EditBank(8, [1, 3], max_rank=3), 2)

        async def request(k: int):
            async def load():
                await asyncio.sleep(rng.random() * 0.002)
                return edits[k]

            try:
                row = await cache.pin(("run", f"g{k}"), load, None, timeout=0.2)
            except CacheFullError:
                st = cache.stats()
                out["busy_503"] += 1
                out["busy_503_with_free_row"] += st.pinned < st.capacity
                return
            try:
                await asyncio.sleep(rng.random() * 0.02)
            finally:
                cache.release(row)

        loop = asyncio.get_running_loop()
        tasks = []
        for _ in range(n):
            t = asyncio.create_task(request(rng.randrange(10)))
            if rng.random() < 0.2:
                loop.call_later(rng.random() * 0.05, t.cancel)
            tasks.append(t)
            await asyncio.sleep(rng.random() * 0.002)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def starvation_trial(trial: int) -> None:
        cache = EditCache(EditBank(8, [1, 3], max_rank=3), 2)
        stop = asyncio.Event()

        async def hot(k: int):
            async def load():
                return edits[k]

            row = await cache.pin(("run", f"h{k}"), load, None, timeout=10)
            await asyncio.sleep(0.02 + rng.random() * 0.02)
            cache.release(row)

        async def traffic():
            tasks = []
            while not stop.is_set():
                tasks += [asyncio.create_task(hot(k)) for k in (0, 1)]
                await asyncio.sleep(0.004)  # arrivals overlap: the hot rows are rarely unpinned
            await asyncio.gather(*tasks)

        t = asyncio.create_task(traffic())
        await asyncio.sleep(0.05)

        async def cold_load():
            return edits[10]

        try:
            row = await cache.pin(("run", f"cold{trial}"), cold_load, None, timeout=1.0)
            cache.release(row)
        except CacheFullError:
            out["cold_groups_starved"] += 1
        stop.set()
        await t

    async def starvation(trials: int):
        for trial in range(trials):
            await starvation_trial(trial)

    asyncio.run(stress())
    asyncio.run(starvation(10))
    return out


def burst_figures(core, n_burst: int, burst_tokens: int) -> dict:
    from chameleon.serving.engine import Engine

    engine = Engine(
        core.model, core.tok, core.eos_ids, max_running=64, max_prefill_tokens=core.cfg.max_prefill_tokens
    )
    tok = core.tok
    results: dict[int, list] = {}
    done = [threading.Event() for _ in range(8 + n_burst)]
    gaps: list[float] = []
    last: dict[int, float] = {}

    def sink(i: int):
        def put(items):
            now = time.perf_counter()
            if i < 8 and i in last:
                gaps.append(now - last[i])
            last[i] = now
            for x in items:
                if isinstance(x, BaseException):
                    results[i] = [x]
                    done[i].set()
                    return
                results.setdefault(i, []).append(x)
                if x.finish_reason:
                    done[i].set()

        return put

    words = tok(" rain", add_special_tokens=False).input_ids
    try:
        for i in range(8):
            engine.submit(greedy_item(tok(f"stream {i}").input_ids, 48), None, sink(i))
        while len(results.get(0, [])) < 4:
            time.sleep(0.005)
        for j in range(n_burst):
            ids = (words * burst_tokens)[: burst_tokens - 1] + [j]
            engine.submit(greedy_item(ids, 2), None, sink(8 + j))
        finished = all(d.wait(600) for d in done)
    finally:
        engine.stop()
    failed = sum(
        1
        for i in range(8)
        if not finished or any(isinstance(x, BaseException) for x in results.get(i, [None]))
    )
    return {
        "burst_prompts": n_burst,
        "burst_prompt_tokens": burst_tokens,
        "max_prefill_tokens": core.cfg.max_prefill_tokens,
        "max_prefill_tokens_seen": engine.stats["max_prefill_tokens_seen"],
        "running_stream_max_gap_s": round(max(gaps, default=0.0), 3),
        "running_streams_failed": failed,
    }


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from serve_mixed import publish_synthetic_run

    from chameleon.config import ModelConfig
    from chameleon.core.model import load_model
    from chameleon.data.storage import LocalStore
    from chameleon.serving.config import ServeConfig
    from chameleon.serving.local import answer
    from chameleon.serving.replica import ModelServer

    torch.set_num_threads(1)
    # The faults below are injected on purpose; their tracebacks would drown the figures.
    logging.getLogger("chameleon.serving").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="serve-faults-"))
    model_id = model_path(args.model)
    model, _tok = load_model(ModelConfig(name_or_path=model_id))
    store = LocalStore(tmp / "store")

    def publish(run_id: str, latest: bool = True) -> list[str]:
        _, users, _ = publish_synthetic_run(store, run_id, model, model_id, 4, 2, 2)
        if not latest:  # the writer moved `latest`: a pinned run is published beside it
            store.put_text("latest", "run-b\n")
        return users

    users = publish("run-a")
    cfg = ServeConfig(
        store=store.uri,
        model=model_id,
        edit_cache_size=2,
        max_prompt_tokens=max(256, args.burst_tokens),
        max_tokens_limit=8,
        default_max_tokens=4,
        max_prefill_tokens=4 * args.burst_tokens,  # the burst needs several prefill steps
        refresh_interval_s=0.5,
        log_requests=False,
    )
    core = ModelServer(cfg, store)
    groups = sorted(core.registry.current.group_ids)
    loop = asyncio.new_event_loop()
    figures: dict = {}
    t0 = time.perf_counter()
    figures.update(template_figures(core, loop, answer))
    figures.update(membership_figures(core, loop, answer, users))
    figures.update(fuzz_figures(core, loop, answer, args.fuzz_requests, args.seed, groups, users))
    figures.update(dead_engine_figures(core, loop, answer))
    figures.update(line_figures(args.stress_requests, args.seed))
    figures.update(burst_figures(core, args.burst, args.burst_tokens))
    figures.update(poison_figures(core, loop, answer))
    core.stop_polling()
    figures.update(
        stale_run_figures(
            lambda: ModelServer(cfg.model_copy(update={"run": "latest"}), store),
            store,
            publish,
            cfg.refresh_interval_s,
        )
    )
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    loop.close()
    order = [
        "poison_kinds",
        "poison_requests_5xx",
        "fuzz_answered_200",
        "errors_5xx_fuzz",
        "template_overrides_accepted",
        "fields_differing_by_membership",
        "dead_engine_answer_status",
        "seconds_to_fail_a_waiting_request",
        "healthy_probes_with_dead_engine",
        "replicas_on_stale_run",
        "busy_503",
        "busy_503_with_free_row",
        "cold_groups_starved",
        "burst_prompts",
        "burst_prompt_tokens",
        "max_prefill_tokens",
        "max_prefill_tokens_seen",
        "running_stream_max_gap_s",
        "running_streams_failed",
        "fuzz_requests",
        "seconds",
        "other_requests_failed",
    ]
    report(
        {k: figures[k] for k in order},
        "other_requests_failed",
        args.out,
        {"model": model_id, "smoke": args.smoke},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
