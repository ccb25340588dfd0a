"""Scaling of the personalization job: per-user time at 100 vs 1,000 users, Ray vs in-process.

    python jobs/bench/pipeline_scaling.py [--sizes 100 1000] [--actors 2] [--smoke] [--out FILE]

A tiny random Llama (hidden 64, 4 layers) with the embedded model's real tokenizer stands in for
the LLM, so the figures measure the system (partitioning, actors, Parquet to S3, reduce, publish)
rather than the model. Output goes to a SeaweedFS on loopback. For each size the same users run
through the Ray job (a local Ray, `--actors` model-replica actors, one CPU share each) and through
the in-process driver.

    per_user_time_ratio = (Ray time per user at the largest size) / (at the smallest)  goal: <= 1.10
    ray_overhead_ratio  = Ray job time / in-process time, at the largest size            goal: <= 1.15
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import parse, parser, report, start_local_ray, synthetic_user

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    import ray
    import torch
    from tiny_models import save_tiny_model

    from chameleon.config import ChameleonConfig
    from chameleon.core.model import load_model
    from chameleon.dev.s3server import LocalS3Server
    from chameleon.job.local import run_local
    from chameleon.job.ray_job import run_ray_job

    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--users-per-partition", type=int, default=25)
    p.add_argument("--pairs", type=int, default=4, help="pairs per user")
    p.add_argument("--tokens", type=int, default=8, help="new tokens per insight and answer")
    # Smoke: one size (one Ray run, one in-process run); its ratios are 1 by construction.
    args = parse(p, {"sizes": [6], "actors": 1, "users_per_partition": 6, "pairs": 2, "tokens": 2})
    tmp = Path(tempfile.mkdtemp(prefix="chameleon-bench-"))
    model_dir = save_tiny_model(tmp / "model")
    cpus = os.cpu_count() or 2
    cfg = ChameleonConfig().with_overrides(
        {
            "model.name_or_path": str(model_dir),
            "synth.pairs_per_user": args.pairs,
            "synth.insight_max_new_tokens": args.tokens,
            "synth.answer_max_new_tokens": args.tokens,
            "synth.batch_size": 64,
            "job.users_per_partition": args.users_per_partition,
            "job.num_actors": args.actors,
            "job.num_cpus_per_actor": max(1.0, cpus / args.actors),
        }
    )
    figures: dict = {}
    start_local_ray(num_cpus=cpus)
    with LocalS3Server() as s3:
        for n in args.sizes:
            users = tmp / f"users-{n}.jsonl"
            users.write_text("".join(json.dumps(synthetic_user(i)) + "\n" for i in range(n)))
            store = s3.store("bench", f"scaling-{n}")
            t0 = time.perf_counter()
            ray_manifest = run_ray_job(str(users), store, f"ray-{n}", cfg, progress=False)
            t_ray = time.perf_counter() - t0
            # In-process reference: the same work with all of the machine's threads.
            torch.set_num_threads(cpus)
            t1 = time.perf_counter()
            local_manifest = run_local(
                str(users),
                store,
                f"local-{n}",
                cfg,
                model_and_tokenizer=load_model(cfg.model),
                progress=False,
            )
            t_local = time.perf_counter() - t1
            figures[f"ray_s_{n}"] = t_ray
            figures[f"local_s_{n}"] = t_local
            figures[f"ray_per_user_s_{n}"] = t_ray / n
            # Where the time went (load_s: opening the run, the Ray driver's input staging included).
            figures[f"ray_timings_{n}"] = json.dumps(ray_manifest.timings_s)
            figures[f"local_timings_{n}"] = json.dumps(local_manifest.timings_s)
    ray.shutdown()
    lo, hi = min(args.sizes), max(args.sizes)
    figures["ray_overhead_ratio"] = figures[f"ray_s_{hi}"] / figures[f"local_s_{hi}"]
    figures["per_user_time_ratio"] = figures[f"ray_per_user_s_{hi}"] / figures[f"ray_per_user_s_{lo}"]
    report(figures, "per_user_time_ratio", args.out, {"actors": args.actors, "cpus": cpus})


if __name__ == "__main__":
    main()
