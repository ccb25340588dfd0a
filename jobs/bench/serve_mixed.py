"""Benchmark: does serving many groups in one batch cost about the same as serving none?

    python jobs/bench/serve_mixed.py [--model ID] [--requests 64] [--concurrency 32] [--max-tokens 16]
                                     [--smoke] [--out FILE]

Two figures, each a ratio of two measurements taken in this run:

- `mixed_vs_plain_throughput`: generated tokens/s of the Serve endpoint (HTTP, official `openai`
  client, `--concurrency` clients) when every request is a different user of a different group,
  over the same load with personalization off. Goal >= 0.9.
- `offline_64_groups_ratio`: tokens/s of `model.generate` on `--offline-batch` prompts each with
  its own group edit (one EditBank bound to the batch's rows), over the same batch unedited; the
  two batches run alternately, `--offline-repeats` times, so both see the same machine noise.
  Goal >= 0.95.

The groups are synthetic (random orthonormal θP, unit θN) and published through `RunWriter` in the
layout `chameleon.data.published` reads, for the model actually loaded (its fingerprint), over the layer band
the job captures by default. Every request generates exactly `--max-tokens` tokens (`ignore_eos`), so
both loads do the same work. Loads alternate (plain, mixed, plain, mixed, ...) to spread machine
noise over both. Prints `name=value` lines, headline last; `--out` writes them as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import TINY_MODEL, model_path, parse, parser, start_local_ray

from chameleon.config import EMBEDDED_MODEL

QUESTIONS = [
    "Paraphrase this tweet: I finished reading a book about the history of the city.",
    "Paraphrase this tweet: our team won the match last night.",
    "Paraphrase this tweet: the weather was cold and rainy this morning.",
    "Paraphrase this tweet: I made pasta for dinner and it turned out well.",
    "Write one sentence about the sea.",
    "Give a short tip for learning a language.",
    "Describe a sunny afternoon in a park.",
    "Say something kind to a friend who had a long day.",
]


def prompt_text(i: int) -> str:
    return f"{QUESTIONS[i % len(QUESTIONS)]} (note {i})"


SMOKE = {
    "model": TINY_MODEL,
    "groups": 4,
    "requests": 4,
    "concurrency": 2,
    "max_tokens": 4,
    "rounds": 1,
    "offline_batch": 4,
    "offline_max_tokens": 4,
    "offline_repeats": 1,
    "max_batch_size": 4,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument(
        "--model", default=EMBEDDED_MODEL, help="base model (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument("--groups", type=int, default=64, help="synthetic groups published (default 64)")
    p.add_argument("--requests", type=int, default=64, help="requests per measured load (default 64)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients (default 32)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="alternating plain/mixed rounds (default 3)")
    p.add_argument(
        "--offline-batch", type=int, default=64, help="prompts (= distinct groups) in the offline batch"
    )
    p.add_argument(
        "--offline-max-tokens", type=int, default=16, help="tokens per prompt offline (default 16)"
    )
    p.add_argument(
        "--offline-repeats", type=int, default=3, help="interleaved timed repeats offline (default 3)"
    )
    p.add_argument(
        "--num-cpus",
        type=float,
        default=1.0,
        help="CPUs (= torch threads) of the model replica and of the offline loop (default 1; more threads "
        "slow down badly on a shared, busy machine)",
    )
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=3, help="rank of each synthetic θP (default 3)")
    p.add_argument("--edit-layers", type=int, default=3, help="edited layers per group (default 3)")
    p.add_argument("--store", help="store for the synthetic run (default: a temporary local directory)")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    return parse(p, SMOKE, argv)


# ---------------------------------------------------------------------------------------------
# A synthetic run


def captured_band(n_layers: int) -> list[int]:
    """The job's default candidate layers: from a quarter of the depth to two before the end."""
    lo, hi = n_layers // 4, max(n_layers // 4 + 1, n_layers - 2)
    return list(range(lo, hi))


def synthetic_edits(hidden: int, captured: list[int], n_groups: int, rank: int, n_layers: int, seed: int = 0):
    import torch

    from chameleon.core.edit import Edit

    g = torch.Generator().manual_seed(seed)
    edits = []
    for _ in range(n_groups):
        pick = torch.randperm(len(captured), generator=g)[: min(n_layers, len(captured))]
        layers = sorted(captured[i] for i in pick.tolist())
        q = torch.linalg.qr(
            torch.randn(len(layers), hidden, rank + 1, generator=g)
        ).Q  # [n, d, r+1] orthonormal cols
        theta_p = q[:, :, :rank].transpose(1, 2).contiguous()
        theta_n = q[:, :, rank].contiguous()
        mean = 0.1 * torch.randn(len(layers), hidden, generator=g)
        edits.append(Edit(layers=layers, theta_p=theta_p, theta_n=theta_n, mean=mean, site="mlp"))
    return edits


def publish_synthetic_run(
    store,
    run_id: str,
    model,
    model_id: str,
    n_groups: int,
    rank: int,
    n_edit_layers: int,
    *,
    seed: int = 0,
    edit: dict | None = None,
):
    """Write a committed run (groups, assignments, manifest, `latest`) for `model`; returns
    (manifest, user ids, edits). `seed` draws the directions, `edit` overrides EditConfig fields."""
    import pyarrow as pa
    import torch

    from chameleon.config import EditConfig
    from chameleon.core.fingerprint import fingerprint_model
    from chameleon.core.model import hidden_size, num_layers
    from chameleon.core.prompts import PROMPT_VERSION
    from chameleon.data.artifacts import RunWriter
    from chameleon.data.manifest import Counts, GroupEntry, ModelInfo, RunManifest

    fp = fingerprint_model(model, model_id)
    captured = captured_band(num_layers(model))
    edits = synthetic_edits(hidden_size(model), captured, n_groups, rank, n_edit_layers, seed=seed)
    writer = RunWriter(store, run_id)
    groups = []
    for j, e in enumerate(edits):
        gid = f"g{j:03d}"
        writer.put_safetensors(
            f"groups/{gid}.safetensors",
            {**e.to_tensors(), "rank": torch.full((len(e.layers),), rank)},
            {"group_id": gid},
        )
        groups.append(
            GroupEntry(
                group_id=gid, n_users=1, n_pairs=0, layers=e.layers, rank=[rank] * len(e.layers), form=e.form
            )
        )
    users = [f"user-{j:03d}" for j in range(n_groups)]
    writer.put_parquet(
        "assignments.parquet",
        pa.table(
            {
                "user_id": pa.array(users, pa.string()),
                "group_id": pa.array([g.group_id for g in groups], pa.string()),
                "distance": pa.array([0.0] * n_groups, pa.float32()),
                "assigned_by": pa.array(["synthetic"] * n_groups, pa.string()),
                "user_shard": pa.array([0] * n_groups, pa.int32()),
                "user_row": pa.array(list(range(n_groups)), pa.int32()),
                "has_user_edit": pa.array([False] * n_groups, pa.bool_()),
                "n_pairs_kept": pa.array([0] * n_groups, pa.int32()),
            }
        ),
    )
    # Synthetic: random orthonormal directions (benchmark), no pairs behind them.
    manifest = writer.commit(
        RunManifest(
            model=ModelInfo(id=model_id, fingerprint=fp.to_dict()),
            hidden_size=fp.hidden_size,
            captured_layers=captured,
            site="mlp",
            max_rank=rank,
            edit=EditConfig(**(edit or {})),
            prompt_version=PROMPT_VERSION,
            groups=groups,
            user_shards=[],
            counts=Counts(
                accepted=n_groups,
                partitions=0,
                users_mapped=n_groups,
                users_failed=0,
                users_with_edit=0,
                groups=n_groups,
                pairs=0,
                pairs_kept=0,
            ),
            timings_s={},
            config={},
        )
    )
    return manifest, users, edits


# ---------------------------------------------------------------------------------------------
# Offline: one batch, 64 groups vs none


def offline_ratio(model, tok, edits, captured, args) -> dict:
    import torch

    from chameleon.core.edit import EditBank
    from chameleon.core.generation import chat_prompt, encode
    from chameleon.core.model import hidden_size, model_device

    n = args.offline_batch
    bank = EditBank(
        hidden_size(model),
        captured,
        site="mlp",
        max_rank=args.rank,
        positions="last",
        device=model_device(model),
    )
    rows = bank.add_many([edits[i % len(edits)] for i in range(min(n, len(edits)))])
    batch_rows = [rows[i % len(rows)] for i in range(n)]
    enc = encode(tok, [chat_prompt(tok, prompt_text(i)) for i in range(n)])
    kw = dict(
        max_new_tokens=args.offline_max_tokens,
        min_new_tokens=args.offline_max_tokens,  # every row generates exactly this many
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
    )

    def timed(edited: bool) -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), bank.apply(model, batch_rows) if edited else contextlib.nullcontext():
            out = model.generate(**enc, **kw)
        assert out.shape[1] - enc["input_ids"].shape[1] == args.offline_max_tokens
        return time.perf_counter() - t0

    timed(False), timed(True)  # warm up
    plain, mixed = [], []
    for _ in range(args.offline_repeats):  # alternately: both see the same machine noise
        plain.append(timed(False))
        mixed.append(timed(True))
    tokens = n * args.offline_max_tokens
    tp, tm = sum(plain) / len(plain), sum(mixed) / len(mixed)
    return {
        "offline_batch": n,
        "offline_distinct_groups": len(set(batch_rows)),
        "offline_plain_tokens_per_s": tokens / tp,
        "offline_64_groups_tokens_per_s": tokens / tm,
        "offline_64_groups_ratio": tp / tm,
        "offline_plain_s": plain,
        "offline_groups_s": mixed,
    }


# ---------------------------------------------------------------------------------------------
# Served: 32 clients over HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_ratio(store, users, model_id: str, args) -> dict:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import requests
    from openai import OpenAI
    from ray import serve

    from chameleon.serving.app import build_app
    from chameleon.serving.config import ServeConfig

    cfg = ServeConfig(
        store=store.uri,
        model=model_id,
        api_key_env=None,
        log_requests=False,
        allow_unauthenticated=True,  # loopback-only benchmark
        personalization_detail="full",  # the check below reads the resolved group
        max_batch_size=args.max_batch_size,
        edit_cache_size=max(len(users), 1),
        max_tokens_limit=max(args.max_tokens, 16),
        default_max_tokens=min(16, max(args.max_tokens, 16)),
        num_cpus=args.num_cpus,
        max_ongoing_requests=max(256, 2 * args.concurrency),
    )
    # RAY_ADDRESS set: Serve runs on that cluster (tests/test_bench_*.py: the pytest session's Ray).
    start_local_ray(num_cpus=max(2, int(args.num_cpus) + 1), log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(cfg, store=store), name="bench", route_prefix="/")
        startup = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def one(i: int, mixed: bool) -> int:
            extra = {"ignore_eos": True}
            if not mixed:
                extra["personalization"] = {"off": True}
            resp = client.chat.completions.create(
                model=cfg.model_name,
                messages=[{"role": "user", "content": prompt_text(i)}],
                max_tokens=args.max_tokens,
                temperature=0,
                user=users[i % len(users)] if mixed else None,
                extra_body=extra,
            )
            want = users[i % len(users)]
            got = resp.personalization
            if mixed and (got["user"] != want or got["group_id"] is None or got["source"] != "user"):
                raise RuntimeError(f"request {i} was not personalized: {got}")
            return resp.usage.completion_tokens

        def load(mixed: bool, n: int, offset: int) -> tuple[int, float]:
            t = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                tokens = sum(pool.map(lambda i: one(offset + i, mixed), range(n)))
            return tokens, time.perf_counter() - t

        # Warm-up: every group resident, both paths compiled/allocated.
        load(True, max(len(users), args.concurrency), 0)
        load(False, args.concurrency, 0)
        totals = {"plain": [0, 0.0], "mixed": [0, 0.0]}
        for r in range(args.rounds):
            for kind in ("plain", "mixed"):
                tok_, dt = load(kind == "mixed", args.requests, r * args.requests)
                totals[kind][0] += tok_
                totals[kind][1] += dt
        health = requests.get(url + "/status", timeout=60).json()
    finally:
        serve.shutdown()
        ray.shutdown()
    plain_tps = totals["plain"][0] / totals["plain"][1]
    mixed_tps = totals["mixed"][0] / totals["mixed"][1]
    return {
        "serve_startup_s": startup,
        "serve_plain_tokens_per_s": plain_tps,
        "serve_mixed_tokens_per_s": mixed_tps,
        "serve_max_batch": health["batching"]["max_batch"],
        "serve_max_groups_in_batch": health["batching"]["max_groups_in_batch"],
        "serve_torch_threads": health["torch_threads"],
        "mixed_vs_plain_throughput": mixed_tps / plain_tps,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from chameleon.config import ModelConfig
    from chameleon.core.model import load_model, num_layers
    from chameleon.data.storage import open_store

    torch.set_num_threads(max(1, int(args.num_cpus)))
    model_id = model_path(args.model)
    model, tok = load_model(ModelConfig(name_or_path=model_id))
    tmp = None
    if args.store:
        store = open_store(args.store)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="chameleon-bench-")
        store = open_store(tmp.name)
    run_id = f"bench-{int(time.time())}"
    _, users, edits = publish_synthetic_run(
        store, run_id, model, model_id, args.groups, args.rank, args.edit_layers
    )
    captured = captured_band(num_layers(model))
    results: dict = {
        "model": args.model,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch_threads": torch.get_num_threads(),
        "groups": args.groups,
        "captured_layers": len(captured),
        "edit_layers": args.edit_layers,
        "rank": args.rank,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "run_id": run_id,
    }
    figures: list[str] = []
    if not args.skip_offline:
        off = offline_ratio(model, tok, edits, captured, args)
        results.update(off)
        figures += ["offline_plain_tokens_per_s", "offline_64_groups_tokens_per_s", "offline_64_groups_ratio"]
    del model
    if not args.skip_serve:
        srv = served_ratio(store, users, model_id, args)
        results.update(srv)
        figures += [
            "serve_plain_tokens_per_s",
            "serve_mixed_tokens_per_s",
            "serve_max_groups_in_batch",
            "mixed_vs_plain_throughput",
        ]
    for name in figures:
        value = results[name]
        print(f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
