"""Benchmark: latency and throughput of the serving engine, and its throughput against offline generate.

    python jobs/bench/serve_latency.py [--requests 256] [--rate 1.0] [--min-tokens 8] [--max-tokens 256]
                                       [--groups 64] [--smoke] [--out FILE]

Each request streams a chat completion from the official `openai` client on loopback, as a
different user of one of `--groups` synthetic groups (every request carries its group's edit),
with an output length drawn from `--min-tokens`..`--max-tokens` (`ignore_eos`; the same lengths and
prompts in every phase). Two loads, after a warm-up:

- **latency**, open loop: request i is sent at `i / rate` seconds whatever the server does (a
  client that waits for answers before sending hides queueing). `ttft_p50_ms`, `ttft_p99_ms` (send
  to first content chunk), `itl_p50_ms`, `itl_p99_ms` (gap between content chunks divided by the
  tokens they carry). Its tokens/s is the arrival rate's, not the engine's capacity.
- **saturated**: every request sent at once, so the engine's running batch stays full
  (`--max-batch-size` rows) until the queue drains. `engine_tokens_per_s` = requested tokens
  over the time from the first send to the last answer.

Offline reference, no server and no edits: plain `model.generate` on the same prompts and lengths,
batches of `--max-batch-size` in arrival order, each batch run to its longest length (what a
static batcher does). `generate_tokens_per_s` counts the requested tokens (as the engine's figure
does); `generate_all_tokens_per_s` counts every token computed, padding rows included.

`engine_vs_generate_throughput` (headline, last) = engine_tokens_per_s / generate_tokens_per_s:
both saturated, both counting the tokens the requests asked for. Goal >= 0.8.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import TINY_MODEL, model_path, parse, parser, start_local_ray
from serve_mixed import _free_port, prompt_text, publish_synthetic_run

from chameleon.config import EMBEDDED_MODEL

SMOKE = {
    "model": TINY_MODEL,
    "groups": 4,
    "requests": 6,
    "rate": 20.0,
    "min_tokens": 2,
    "max_tokens": 6,
    "warmup": 2,
    "max_batch_size": 4,
}


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--groups", type=int, default=64, help="synthetic groups, one per user (default 64)")
    p.add_argument("--requests", type=int, default=256, help="requests per load (default 256)")
    p.add_argument(
        "--rate", type=float, default=1.0, help="arrivals per second of the latency load (default 1.0)"
    )
    p.add_argument("--min-tokens", type=int, default=8, help="shortest output (default 8)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest output (default 256)")
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests (default 8)")
    p.add_argument("--max-batch-size", type=int, default=32, help="engine's running batch; generate's batch")
    p.add_argument(
        "--stream-interval-s", type=float, default=0.02, help="continuous engine's chunk gathering"
    )
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the model replica")
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--edit-layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-generate", action="store_true", help="no plain generate() baseline")
    return parse(p, SMOKE, argv)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def open_loop(url: str, model_name: str, users: list[str], lengths: list[int], rate: float) -> dict:
    """Send request i at i / rate seconds (rate inf: all at once); stream each answer; per-request
    timings."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    t0 = time.perf_counter() + 0.2

    async def one(i: int) -> dict:
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))  # i / inf == 0
        sent = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": prompt_text(i)}],
            max_tokens=lengths[i],
            temperature=0,
            user=users[i % len(users)],
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        first, last, tokens, gaps = None, sent, 0, []
        group = None
        async for chunk in stream:
            group = group or (getattr(chunk, "personalization", None) or {}).get("group_id")
            if not chunk.choices:
                continue
            n = len(getattr(chunk.choices[0], "token_ids", None) or [])
            if n == 0:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps += [(now - last) / n] * n
            last, tokens = now, tokens + n
        if group is None:
            raise RuntimeError(f"request {i} was not personalized")
        return {"sent": sent, "first": first, "done": last, "tokens": tokens, "gaps": gaps}

    results = await asyncio.gather(*(one(i) for i in range(len(lengths))))
    await client.close()
    return {"results": results}


def measure_engine(store, users, args, lengths, url: str) -> dict:
    """Deploy the app, warm it up, then the latency load and the saturated load."""
    import requests
    from ray import serve

    from chameleon.serving.app import build_app
    from chameleon.serving.config import ServeConfig

    cfg = ServeConfig(
        store=store.uri,
        model=args.model_path,
        api_key_env=None,
        allow_unauthenticated=True,  # loopback-only benchmark
        personalization_detail="full",  # the client checks each answer's resolved group
        max_batch_size=args.max_batch_size,
        stream_interval_s=args.stream_interval_s,
        edit_cache_size=max(len(users), 1),
        max_tokens_limit=max(args.max_tokens, 16),
        default_max_tokens=16,
        num_cpus=args.num_cpus,
        max_ongoing_requests=max(1024, 2 * args.requests),
        log_requests=False,
    )
    serve.run(build_app(cfg, store=store), name="bench-latency", route_prefix="/")
    try:
        warm = [args.min_tokens] * args.warmup
        asyncio.run(open_loop(url, cfg.model_name, users, warm, rate=1000.0))
        latency = asyncio.run(open_loop(url, cfg.model_name, users, lengths, args.rate))["results"]
        saturated = asyncio.run(open_loop(url, cfg.model_name, users, lengths, float("inf")))["results"]
        status = requests.get(url + "/status", timeout=60).json()
    finally:
        serve.delete("bench-latency")
    for res in (latency, saturated):
        tokens = sum(r["tokens"] for r in res)
        if tokens != sum(lengths):
            raise RuntimeError(f"{tokens} tokens generated, {sum(lengths)} asked")
    ttft = [(r["first"] - r["sent"]) * 1000 for r in latency]
    itl = [g * 1000 for r in latency for g in r["gaps"]]
    span = max(r["done"] for r in saturated) - min(r["sent"] for r in saturated)
    return {
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50),
        "itl_p99_ms": percentile(itl, 99),
        "engine_tokens_per_s": sum(lengths) / span,
        "max_batch": status["batching"].get("max_batch"),
        "max_groups_in_batch": status["batching"].get("max_groups_in_batch"),
    }


def generate_baseline(model, tok, lengths: list[int], batch_size: int) -> tuple[float, float]:
    """Plain `model.generate`, batches in arrival order, each to its longest length: (requested
    tokens/s, every computed token/s)."""
    import torch

    from chameleon.core.generation import chat_prompt, encode

    prompts = [chat_prompt(tok, prompt_text(i)) for i in range(len(lengths))]
    enc = encode(tok, prompts[:2])
    with torch.no_grad():  # warm-up
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    tokens, spent = 0, 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n = max(lengths[start : start + batch_size])
        enc = encode(tok, chunk)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        spent += time.perf_counter() - t
        tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(chunk)
    return sum(lengths) / spent, tokens / spent


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch
    from ray import serve

    from chameleon.config import ModelConfig
    from chameleon.core.model import load_model
    from chameleon.data.storage import open_store

    args.model_path = model_path(args.model)
    torch.set_num_threads(max(1, int(args.num_cpus)))
    model, tok = load_model(ModelConfig(name_or_path=args.model_path))
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests)]
    tmp = tempfile.TemporaryDirectory(prefix="chameleon-bench-")
    store = open_store(tmp.name)
    _, users, _ = publish_synthetic_run(
        store, f"bench-{int(time.time())}", model, args.model_path, args.groups, args.rank, args.edit_layers
    )
    results: dict = {
        "model": args.model,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "requests": args.requests,
        "rate": args.rate,
        "lengths": [args.min_tokens, args.max_tokens],
        "mean_length": sum(lengths) / len(lengths),
        "groups": args.groups,
        "max_batch_size": args.max_batch_size,
        "num_cpus": args.num_cpus,
    }
    # RAY_ADDRESS set: Serve runs on that cluster (tests/test_bench_*.py: the pytest session's Ray).
    start_local_ray(num_cpus=max(2, int(args.num_cpus) + 1), log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results.update(measure_engine(store, users, args, lengths, f"http://127.0.0.1:{port}"))
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    names = [
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "max_groups_in_batch",
        "engine_tokens_per_s",
    ]
    if not args.skip_generate:
        useful, computed = generate_baseline(model, tok, lengths, args.max_batch_size)
        results.update(
            generate_tokens_per_s=useful,
            generate_all_tokens_per_s=computed,
            engine_vs_generate_throughput=results["engine_tokens_per_s"] / useful,
        )
        names += ["generate_all_tokens_per_s", "generate_tokens_per_s", "engine_vs_generate_throughput"]
    for name in names:
        value = results[name]
        print(f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
