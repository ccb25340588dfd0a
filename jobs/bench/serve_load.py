"""Load test: many groups, a small edit cache, a run switch mid-load; every answer checked.

    python jobs/bench/serve_load.py [--requests 1000] [--concurrency 64] [--groups 48]
                                    [--edit-cache-size 16] [--unknown-frac 0.15] [--max-tokens 8] [--smoke] [--out FILE]

Two synthetic runs (random orthonormal directions, `--alpha` strong enough that the groups answer
differently) are published to a real S3-compatible server on loopback (SeaweedFS, as the tests
use; `--store DIR` for a local directory instead). The Serve endpoint starts on the first, with an
edit cache smaller than the number of groups. `--concurrency` clients (the official `openai`
client over HTTP, so the script works unchanged on any decode engine) send `--requests` greedy
requests: users of every group plus unknown users (the fallback: the base model). When half of
them are answered, `latest` moves to the second run.

Each answer's tokens are compared with offline generation (`model.generate` with the group's edit
applied through `EditBank`, no serving code) for the (run, group) the answer names. Prints
`errors_5xx`, `wrong_group` (the server resolved another group than the user's), `token_mismatches`,
`p50_ms`, `p99_ms` (and a few more), `name=value` lines, headline last.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TINY_MODEL, model_path, parse, parser, report  # (also puts the checkout on sys.path)
from serve_mixed import _free_port, prompt_text, publish_synthetic_run

from chameleon.config import EMBEDDED_MODEL

KEY_ENV = "CHAMELEON_BENCH_KEY"


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL, help="base model (default: embedded SmolLM2-135M)")
    p.add_argument("--requests", type=int, default=1000, help="requests in all (default 1000)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent HTTP clients (default 64)")
    p.add_argument("--groups", type=int, default=48, help="groups per run (default 48)")
    p.add_argument("--edit-cache-size", type=int, default=16, help="edit rows per replica (default 16)")
    p.add_argument("--unknown-frac", type=float, default=0.15, help="share of unknown users (default 0.15)")
    p.add_argument("--prompts", type=int, default=4, help="distinct prompts (default 4)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per answer (default 8)")
    p.add_argument("--alpha", type=float, default=4.0, help="edit alpha=beta of the runs (default 4)")
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--edit-layers", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--admission-timeout-s",
        type=float,
        default=60.0,
        help="deadline for an edit row (default 60; a busy CPU box needs more: rows turn over per batch)",
    )
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (torch threads) of the model replica")
    p.add_argument("--store", help="a local directory for the runs (default: SeaweedFS on loopback)")
    smoke = {
        "model": TINY_MODEL,
        "requests": 16,
        "concurrency": 4,
        "groups": 4,
        "edit_cache_size": 2,
        "prompts": 2,
        "max_tokens": 3,
        "max_batch_size": 4,
    }
    args = parse(p, smoke, argv)
    args.model = model_path(args.model)
    return args


def offline_reference(model, tok, run, group_ids, prompts: list[str], max_tokens: int) -> dict:
    """(group or None, prompt index) -> greedy token ids, straight from model.generate."""
    import contextlib

    import torch

    from chameleon.core.generation import bank_for_edits, chat_prompt

    greedy = dict(
        max_new_tokens=max_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
    )
    out = {}
    for gid in [None, *group_ids]:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if gid is not None:
                bank, rows = bank_for_edits(model, [run.group_edit(gid)], run.manifest.edit)
                stack.enter_context(bank.apply(model, rows))
            for k, text in enumerate(prompts):
                enc = tok([chat_prompt(tok, text)], return_tensors="pt", add_special_tokens=False)
                out[gid, k] = model.generate(**enc, **greedy)[0, enc.input_ids.shape[1] :].tolist()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from chameleon.config import ModelConfig
    from chameleon.core.model import load_model
    from chameleon.data.artifacts import RunReader
    from chameleon.data.published import PublishedRun
    from chameleon.data.storage import open_store

    torch.set_num_threads(max(1, int(args.num_cpus)))
    model, tok = load_model(ModelConfig(name_or_path=args.model))
    s3 = tmp = None
    if args.store:
        store = open_store(args.store)
    else:
        from chameleon.dev.s3server import LocalS3Server

        tmp = tempfile.TemporaryDirectory(prefix="chameleon-load-")
        s3 = LocalS3Server(data_dir=tmp.name).start()
        store = s3.store("bench", f"load-{uuid.uuid4().hex[:6]}")
    prompts = [prompt_text(k) for k in range(args.prompts)]
    runs, refs = {}, {}
    t0 = time.perf_counter()
    for seed, run_id in enumerate(("load-run-a", "load-run-b")):
        _, users, _ = publish_synthetic_run(
            store,
            run_id,
            model,
            args.model,
            args.groups,
            args.rank,
            args.edit_layers,
            seed=seed,
            edit={"alpha": args.alpha, "beta": args.alpha},
        )
        runs[run_id] = PublishedRun(RunReader(store, run_id))
        refs[run_id] = offline_reference(
            model, tok, runs[run_id], runs[run_id].group_ids, prompts, args.max_tokens
        )
    offline_s = time.perf_counter() - t0
    user_group = {u: f"g{j:03d}" for j, u in enumerate(users)}  # the same in both runs
    distinct = len({tuple(v) for k, v in refs["load-run-a"].items() if k[1] == 0})
    store.put_text("latest", "load-run-a\n")
    del model

    import ray
    from openai import APIStatusError, OpenAI
    from ray import serve

    from chameleon.serving.app import build_app
    from chameleon.serving.config import ServeConfig

    key = "sk-load-" + uuid.uuid4().hex
    os.environ[KEY_ENV] = key
    cfg = ServeConfig(
        store=store.uri,
        model=args.model,
        api_key_env=KEY_ENV,
        personalization_detail="full",  # the benchmark checks the group the server resolved
        max_batch_size=args.max_batch_size,
        edit_cache_size=args.edit_cache_size,
        max_tokens_limit=max(args.max_tokens, 16),
        default_max_tokens=min(16, max(args.max_tokens, 16)),
        num_cpus=args.num_cpus,
        max_ongoing_requests=max(256, 2 * args.concurrency),
        refresh_interval_s=0.5,
        admission_timeout_s=args.admission_timeout_s,
    )
    ray.init(
        address="local",
        num_cpus=max(2, int(args.num_cpus) + 1),
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        log_to_driver=False,
    )
    rng_users = [*users, *(f"unknown-{j}" for j in range(max(1, args.groups // 4)))]
    n_unknown_every = max(1, round(1 / args.unknown_frac)) if args.unknown_frac > 0 else 0
    results: list[dict] = []
    lock = threading.Lock()
    half = args.requests // 2  # answers received when `latest` moves to the second run
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg, store=store), name="load", route_prefix="/")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)

        def one(i: int) -> None:
            if n_unknown_every and i % n_unknown_every == 0:
                user = rng_users[len(users) + (i // n_unknown_every) % (len(rng_users) - len(users))]
            else:
                user = users[(i * 7) % len(users)]
            k = i % len(prompts)
            t = time.perf_counter()
            row = {"user": user, "prompt": k}
            try:
                resp = client.chat.completions.create(
                    model=cfg.model_name,
                    messages=[{"role": "user", "content": prompts[k]}],
                    max_tokens=args.max_tokens,
                    temperature=0,
                    user=user,
                    extra_body={"return_token_ids": True},
                )
                row.update(
                    status=200,
                    pers=resp.personalization,
                    ids=resp.choices[0].token_ids,
                )
            except APIStatusError as exc:
                row.update(status=exc.status_code, body=exc.response.text[:300])
            except Exception as exc:  # no HTTP answer at all (connection reset, client timeout)
                row.update(status=-1, body=repr(exc)[:300])
            row["ms"] = 1000 * (time.perf_counter() - t)
            with lock:
                results.append(row)
                if len(results) == half:
                    store.put_text("latest", "load-run-b\n")  # the switch, mid-load

        t_load = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for f in [pool.submit(one, i) for i in range(args.requests)]:
                f.result()
        wall = time.perf_counter() - t_load
    finally:
        serve.shutdown()
        ray.shutdown()
        if s3 is not None:
            s3.stop()
        if tmp is not None:
            tmp.cleanup()

    ok = [r for r in results if r["status"] == 200]
    wrong_group = mismatches = 0
    by_run: dict[str, int] = {}
    for r in ok:
        run_id = r["pers"]["run_id"]
        by_run[run_id] = by_run.get(run_id, 0) + 1
        want = user_group.get(r["user"])  # None: an unknown user, the base model
        if r["pers"]["group_id"] != want:
            wrong_group += 1
        ref = refs[run_id][want, r["prompt"]]
        if not r["ids"] or r["ids"] != ref[: len(r["ids"])]:
            mismatches += 1
    ms = sorted(r["ms"] for r in ok)
    figures = {
        "requests": len(results),
        "concurrency": args.concurrency,
        "groups": args.groups,
        "edit_cache_size": args.edit_cache_size,
        "distinct_offline_answers": distinct,
        "answers_run_a": by_run.get("load-run-a", 0),
        "answers_run_b": by_run.get("load-run-b", 0),
        "errors_4xx": sum(400 <= r["status"] < 500 for r in results),
        "no_answer": sum(r["status"] < 0 for r in results),
        "offline_reference_s": offline_s,
        "load_wall_s": wall,
        "errors_5xx": sum(r["status"] >= 500 for r in results),
        "wrong_group": wrong_group,
        "token_mismatches": mismatches,
        "p50_ms": statistics.median(ms) if ms else float("nan"),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan"),
    }
    report(figures, "token_mismatches", args.out)
    bad = [r for r in results if r["status"] >= 500 or r["status"] < 0][:3]
    if bad:
        print("first 5xx bodies:", bad, file=sys.stderr)
    clean = figures["errors_5xx"] == figures["no_answer"] == figures["wrong_group"] == 0
    return 0 if clean and figures["token_mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
