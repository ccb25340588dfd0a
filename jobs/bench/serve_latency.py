"""Benchmark: latency and throughput of the continuous engine (the static path is retired).

    python jobs/bench/serve_latency.py [--requests 256] [--rate 2.0] [--min-tokens 8] [--max-tokens 256]
                                       [--groups 64] [--out FILE]

Open-loop arrivals: request i is sent at `i / rate` seconds whatever the server does (a
client that waits for answers before sending hides queueing). Each request streams a chat
completion from the official `openai` client on loopback, as a different user of one of `--groups`
synthetic groups, with an output length drawn from `--min-tokens`..`--max-tokens` (`ignore_eos`,
the same lengths and prompts for every engine). Both engines are served one after the other in
one run, by the same Ray instance, each after a warm-up.

Per engine: `ttft_p50_ms`, `ttft_p99_ms` (send to first content chunk), `itl_p99_ms` (gap between
content chunks divided by the tokens they carry), `tokens_per_s` (generated tokens over the time
from the first send to the last answer). Then:

- (`ttft_p99_ratio` and `throughput_ratio` compared it with the static path, which serving no
  longer has: they are not printed),
- `engine_vs_generate_throughput` (headline, last) = continuous tokens/s over plain
  `model.generate` on the same prompts and lengths, batches of `--max-batch-size` in arrival
  order, no server, no edits, every generated token counted (goal >= 0.8).
"""

from __future__ import annotations

import argparse
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

from serve_mixed import _free_port, prompt_text, publish_synthetic_run

from chameleon.config import EMBEDDED_MODEL


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--groups", type=int, default=64, help="synthetic groups, one per user (default 64)")
    p.add_argument("--requests", type=int, default=256, help="requests per engine (default 256)")
    p.add_argument("--rate", type=float, default=1.0, help="arrivals per second (default 1.0)")
    p.add_argument("--min-tokens", type=int, default=8, help="shortest output (default 8)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest output (default 256)")
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests per engine (default 8)")
    p.add_argument("--engines", default="continuous", choices=["continuous"], help="the one engine")
    p.add_argument("--max-batch-size", type=int, default=32, help="the engine's running batch")
    p.add_argument(
        "--stream-interval-s", type=float, default=0.02, help="continuous engine's chunk gathering"
    )
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the model replica")
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--edit-layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-generate", action="store_true", help="no plain generate() baseline")
    p.add_argument("--out", help="write the figures and settings as JSON here")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def open_loop(url: str, model_name: str, users: list[str], lengths: list[int], rate: float) -> dict:
    """Send request i at i / rate seconds; stream each answer; per-request timings."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    t0 = time.perf_counter() + 0.2

    async def one(i: int) -> dict:
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
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


def measure_engine(engine: str, store, users, args, lengths, port_holder: dict) -> dict:
    import requests
    from ray import serve

    from chameleon.serving.app import build_app
    from chameleon.serving.config import ServeConfig

    cfg = ServeConfig(
        store=store.uri,
        model=args.model,
        api_key_env=None,
        max_batch_size=args.max_batch_size,
        stream_interval_s=args.stream_interval_s,
        edit_cache_size=max(len(users), 1),
        max_tokens_limit=max(args.max_tokens, 16),
        default_max_tokens=16,
        num_cpus=args.num_cpus,
        max_ongoing_requests=max(1024, 2 * args.requests),
        log_requests=False,
    )
    serve.run(build_app(cfg, store=store), name=f"bench-{engine}", route_prefix="/")
    url = port_holder["url"]
    try:
        warm = [args.min_tokens] * args.warmup
        asyncio.run(open_loop(url, cfg.model_name, users, warm, rate=1000.0))
        t = time.perf_counter()
        out = asyncio.run(open_loop(url, cfg.model_name, users, lengths, args.rate))
        wall = time.perf_counter() - t
        health = requests.get(url + "/healthz", timeout=60).json()
    finally:
        serve.delete(f"bench-{engine}")
    res = out["results"]
    ttft = [(r["first"] - r["sent"]) * 1000 for r in res]
    itl = [g * 1000 for r in res for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in res)
    span = max(r["done"] for r in res) - min(r["sent"] for r in res)
    if tokens != sum(lengths):
        raise RuntimeError(f"{engine}: {tokens} tokens generated, {sum(lengths)} asked")
    return {
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50),
        "itl_p99_ms": percentile(itl, 99),
        "tokens_per_s": tokens / span,
        "wall_s": wall,
        "max_batch": health["batching"].get("max_batch"),
        "max_groups_in_batch": health["batching"].get("max_groups_in_batch"),
    }


def generate_baseline(model, tok, lengths: list[int], batch_size: int) -> float:
    """Tokens/s of plain `model.generate`: batches in arrival order, each to its longest length."""
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
    return tokens / spent


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

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    torch.set_num_threads(max(1, int(args.num_cpus)))
    model, tok = load_model(ModelConfig(name_or_path=args.model))
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests)]
    tmp = tempfile.TemporaryDirectory(prefix="chameleon-bench-")
    store = open_store(tmp.name)
    _, users, _ = publish_synthetic_run(
        store, f"bench-{int(time.time())}", model, args.model, args.groups, args.rank, args.edit_layers
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
    ray.init(
        address="local",
        num_cpus=max(2, int(args.num_cpus) + 1),
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        log_to_driver=False,
    )
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        holder = {"url": f"http://127.0.0.1:{port}"}
        for engine in engines:
            results[engine] = measure_engine(engine, store, users, args, lengths, holder)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    lines: list[tuple[str, float]] = []
    for engine in engines:
        for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "tokens_per_s"):
            lines.append((f"{engine}_{k}", results[engine][k]))
    if "continuous" in results and "static" in results:
        c, s = results["continuous"], results["static"]
        lines.append(("ttft_p99_ratio", c["ttft_p99_ms"] / s["ttft_p99_ms"]))
        lines.append(("throughput_ratio", c["tokens_per_s"] / s["tokens_per_s"]))
    if not args.skip_generate and "continuous" in results:
        gen = generate_baseline(model, tok, lengths, args.max_batch_size)
        results["generate_tokens_per_s"] = gen
        lines.append(("generate_tokens_per_s", gen))
        lines.append(("engine_vs_generate_throughput", results["continuous"]["tokens_per_s"] / gen))
    for name, value in lines:
        results[name] = value
        print(f"{name}={value:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
