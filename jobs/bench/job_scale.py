"""The job at scale: driver memory vs input size, an incremental refresh vs a full run, and the
reduce's parallel partition reads. Loopback SeaweedFS, a tiny random Llama with the embedded
model's real tokenizer (the figures measure the system, not the model).

    python jobs/bench/job_scale.py [--smoke] [--out FILE] [--memory-users N1 N2] [--update-users N]
                                   [--map defaults|short] [--partitions N] [--skip memory update reads]

    driver_input_memory_ratio  peak RSS of the Ray driver opening a run (input read, validated,
                               hash-partitioned and staged on Ray Data) with --memory-users N2 vs
                               N1 input users (each in a fresh process)                goal <= 1.2
    update_time_ratio          `--update-from` refresh of --update-users users with 1 % changed
                               vs a full run of the same new input, both with the project's
                               default map settings (--map short: SHORT_MAP)            goal <= 0.15
    update_model_calls_for_unchanged_users   unchanged users the refresh gave the model   goal 0
    update_mismatches          differences between the refresh and the full run (unchanged
                               users' stored per-user results and published edits within 1e-5,
                               every user's group, every group edit within 1e-5)      goal 0
    reduce_read_speedup        the reduce's partition reads (profiles + failures of each, checksums
                               verified) of --partitions partitions, job.read_threads=16 vs 1,
                               each GET first waiting --store-latency-ms (20: S3's time to first
                               byte; loopback has none)                                 goal >= 3
    reduce_read_speedup_loopback   the same on bare loopback (bound by the shared CPU, not latency)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import parse, parser, report, start_local_ray, synthetic_user

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def write_users(path: Path, ids, changed=frozenset(), files: int = 1) -> Path:
    """Users as `files` JSONL files in a directory (streamed: never all in memory)."""
    path.mkdir(parents=True, exist_ok=True)
    ids = list(ids)
    per = -(-len(ids) // files)
    for f in range(files):
        with open(path / f"part-{f:03d}.jsonl", "w") as out:
            for i in ids[f * per : (f + 1) * per]:
                out.write(json.dumps(synthetic_user(i, changed=i in changed)) + "\n")
    return path


SHORT_MAP = {
    "synth.pairs_per_user": 4,
    "synth.answer_max_new_tokens": 8,
    "synth.insight_max_new_tokens": 8,
    "synth.batch_size": 64,
    "subspace.ccs_steps": 200,
    "subspace.ccs_restarts": 3,
}
"""`--map short`: a map stage about ten times cheaper per user than the project's defaults (fewer
pairs, 8 new tokens instead of 48 and 64, fewer CCS steps). Calibration, a fixed cost of every
run, is unchanged, so it weighs far more in a short run than in a default one."""


def config(model_dir: Path, short_map: bool = True, **overrides):
    from chameleon.config import ChameleonConfig

    base = {"model.name_or_path": str(model_dir), **(SHORT_MAP if short_map else {})}
    return ChameleonConfig().with_overrides({**base, **overrides})


# -- driver memory (each size in a fresh process) -------------------------------------------------


def memory_child(users_dir: str, model_dir: str, endpoint: str, access: str, secret: str) -> None:
    """Open a Ray run over `users_dir` as the Ray driver does; print this process's peak RSS."""
    import ray

    from chameleon.data.storage import S3Store
    from chameleon.job.ray_input import stage_input
    from chameleon.job.run import begin_run
    from chameleon.job.spec import model_identity

    start_local_ray(num_cpus=2)
    store = S3Store(
        "bench",
        f"memory-{os.getpid()}",
        endpoint_url=endpoint,
        access_key=access,
        secret_key=secret,
        create_bucket=True,
    )
    cfg = config(Path(model_dir))
    t0 = time.perf_counter()
    plan = begin_run(
        users_dir, store, "r", cfg, model_identity(cfg), stage_input=lambda w: stage_input(users_dir, w, cfg)
    )
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak_mib, "seconds": seconds, "accepted": plan.counts["accepted"]}))
    ray.shutdown()


def driver_memory(n: int, tmp: Path, model_dir: Path, s3) -> dict:
    users = write_users(tmp / f"memory-{n}", range(n), files=max(1, n // 10_000))
    args = [sys.executable, __file__, "--memory-child", str(users), str(model_dir), s3.endpoint_url]
    args += [s3.access_key, s3.secret_key]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the driver-memory run for {n} users failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- refresh vs full run ----------------------------------------------------------------------------


def refresh_figures(n: int, tmp: Path, model_dir: Path, store, short_map: bool) -> dict:
    from chameleon.data.artifacts import RunReader
    from chameleon.data.layout import done_key
    from chameleon.job.local import run_local
    from chameleon.job.refresh import compare_runs

    cfg = config(model_dir, short_map)
    changed = set(range(0, n, 100))  # 1 %
    old = write_users(tmp / "update-old", range(n))
    new = write_users(tmp / "update-new", range(n), changed=changed)
    run_local(str(old), store, "day-1", cfg, progress=False)
    t0 = time.perf_counter()
    manifest = run_local(str(new), store, "day-2", cfg, progress=False, update_from="day-1")
    t_refresh = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_local(str(new), store, "full", cfg, progress=False)
    t_full = time.perf_counter() - t1
    unchanged = sorted(f"user-{i:06d}" for i in range(n) if i not in changed)
    reader = RunReader(store, "day-2")
    reused = {
        u for k in range(manifest.counts.partitions) for u in reader.run_store.get_json(done_key(k))["reused"]
    }
    mismatches = compare_runs(reader, RunReader(store, "full"), unchanged)
    for line in mismatches[:5]:
        print("mismatch:", line, file=sys.stderr)
    return {
        "update_users": n,
        "update_map": "short" if short_map else "defaults",
        "update_changed_users": len(changed),
        "update_refresh_s": t_refresh,
        "update_full_s": t_full,
        "update_refresh_timings": json.dumps(manifest.timings_s),
        "update_model_calls_for_unchanged_users": len(set(unchanged) - reused),
        "update_mismatches": len(mismatches),
        "update_time_ratio": t_refresh / t_full,
    }


# -- parallel partition reads ---------------------------------------------------------------------


def read_figures(n_parts: int, store, latency_ms: float, users_per_part: int = 64) -> dict:
    import torch

    from chameleon.core.synth import UserPairs
    from chameleon.data.artifacts import RunWriter
    from chameleon.data.layout import part_keys
    from chameleon.data.parallel_reads import read_in_order
    from chameleon.job.run import write_partition
    from chameleon.job.stages import pairs_to_tables

    writer = RunWriter(store, "reads")
    g = torch.Generator().manual_seed(0)
    for k in range(n_parts):
        pairs = [
            UserPairs(
                user_id=f"u{k:04d}-{i:03d}", group_id=None, selected=[0], history_embedding=torch.randn(64, generator=g),
                insight_p="", insight_n="", queries=["q"] * 4, personalized=["p"] * 4, neutral=["n"] * 4,
                emb_p=torch.randn(4, 6, 64, generator=g), emb_n=torch.randn(4, 6, 64, generator=g),
                heldout_queries=[], heldout_texts=[],
            )
            for i in range(users_per_part)
        ]  # fmt: skip
        write_partition(writer, k, *pairs_to_tables(pairs), [])

    def read(k: int) -> int:  # what the reduce's first pass reads of a partition
        keys = part_keys(k)
        return len(writer.get_jsonl(keys.failures)) + writer.get_parquet(keys.profiles).num_rows

    def timed(threads: int) -> float:
        t0 = time.perf_counter()
        assert sum(read_in_order(read, range(n_parts), threads)) == n_parts * users_per_part
        return time.perf_counter() - t0

    loopback = timed(1) / timed(16)
    writer.run_store = WithLatency(writer.run_store, latency_ms / 1000)
    sequential, parallel = timed(1), timed(16)
    return {
        "reduce_read_partitions": n_parts,
        "reduce_read_speedup_loopback": loopback,
        "store_latency_ms": latency_ms,
        "reduce_read_sequential_s": sequential,
        "reduce_read_parallel_s": parallel,
        "reduce_read_speedup": sequential / parallel,
    }


class WithLatency:
    """A store whose every GET first waits `seconds` (an object store's time to first byte,
    which loopback does not have; the wait holds no CPU, as a network wait does not)."""

    def __init__(self, store, seconds: float) -> None:
        self.store, self.seconds = store, seconds

    def get_bytes(self, key: str) -> bytes:
        time.sleep(self.seconds)
        return self.store.get_bytes(key)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(*sys.argv[2:7])
        return
    from tiny_models import save_tiny_model

    from chameleon.dev.s3server import LocalS3Server

    p = parser(__doc__)
    p.add_argument("--memory-users", type=int, nargs=2, default=[10_000, 100_000], metavar=("N1", "N2"))
    p.add_argument("--update-users", type=int, default=2_000)
    p.add_argument("--partitions", type=int, default=200)
    p.add_argument(
        "--store-latency-ms",
        type=float,
        default=20.0,
        help="time to first byte added to each GET of the read figure (S3 answers a GET in tens of "
        "ms; loopback in well under one); reduce_read_speedup_loopback is measured without it",
    )
    p.add_argument(
        "--map",
        choices=["defaults", "short"],
        default="defaults",
        help="the refresh's map settings: the project's defaults, or SHORT_MAP (about ten times "
        "cheaper per user; calibration then weighs far more in both runs)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["memory", "update", "reads"])
    args = parse(
        p,
        {
            "memory_users": [100, 1_000],
            "update_users": 12,
            "partitions": 10,
            "store_latency_ms": 2.0,
            "map": "short",
        },
    )
    mem, n_update = args.memory_users, args.update_users
    tmp = Path(tempfile.mkdtemp(prefix="chameleon-scale-"))
    model_dir = save_tiny_model(tmp / "model")
    figures: dict = {}
    with LocalS3Server() as s3:
        if "reads" not in args.skip:
            figures.update(read_figures(args.partitions, s3.store("bench", "reads"), args.store_latency_ms))
        if "update" not in args.skip:
            figures.update(
                refresh_figures(n_update, tmp, model_dir, s3.store("bench", "update"), args.map == "short")
            )
        if "memory" not in args.skip:
            small, large = (driver_memory(n, tmp, model_dir, s3) for n in mem)
            figures.update(
                {
                    "driver_input_users_small": mem[0],
                    "driver_input_users_large": mem[1],
                    "driver_peak_mib_small": small["peak_mib"],
                    "driver_peak_mib_large": large["peak_mib"],
                    "driver_open_s_large": large["seconds"],
                    "driver_input_memory_ratio": large["peak_mib"] / small["peak_mib"],
                }
            )
    headline = next(
        k for k in ("driver_input_memory_ratio", "update_time_ratio", "reduce_read_speedup") if k in figures
    )
    report(figures, headline, args.out, {"smoke": args.smoke})


if __name__ == "__main__":
    main()
