"""The batch job keeps users' data whole: poison input, forgetting users, group privacy, driver memory.

    python jobs/bench/job_integrity.py [--only NAME[,NAME]] [--workdir DIR] [--out FILE]
        [--users 100] [--mem-sizes 1000,10000] [--hidden 64] [--layers 6] [--pairs 8]

Checks (each `check_<name>(workdir, args) -> {figure: value}`; `--only` picks some):

- poison_input: `--users` good users plus every malformed kind of `chameleon.dev.poison`, as JSONL,
  as a LaMP JSON list, and one Parquet file per odd schema, through the job's first step
  (`job.run.begin_run`: read, validate, write rejects.jsonl). `records_lost` = input records
  neither accepted nor rejected; `crashes` = files whose step raised (a file without any good row
  must raise the clear "no valid user records" error, which is not counted).
- forget: a run of random pairs (no model: uncalibrated edits), then `forget_users` with
  `delete_old`; every object of the new run is searched for the user's id and texts (Parquet also
  decoded). `user_bytes_found` must be 0.
- groups: column groups with a singleton and a group whose members mostly lack pairs, both
  policies; `groups_below_min_contributors` counts published groups under the floor.
- driver_memory: peak RSS of a fresh process running the job's reduce and publish
  (`job.publish.reduce_and_publish`) on stored partitions of random pairs that carry their users'
  own reduce (the map stage's work, done here while writing them), per size in `--mem-sizes`;
  `driver_memory_ratio` = largest over smallest (goal <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from common import parser, report

from chameleon.config import ChameleonConfig
from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.synth import UserPairs
from chameleon.data.artifacts import RunWriter
from chameleon.data.inputs import prepare_input
from chameleon.data.storage import LocalStore, read_parquet_bytes
from chameleon.dev.poison import GOOD_KINDS, MALFORMED_KINDS, PARQUET_KINDS
from chameleon.job.forget import forget_users
from chameleon.job.publish import reduce_and_publish
from chameleon.job.run import begin_run, write_partition
from chameleon.job.stages import (
    attach_user_reduce,
    pairs_to_tables,
    reduce_all,
    reduce_subspace_config,
    reduce_users,
    tables_to_units,
)

POISON_CFG = ChameleonConfig()


def _begin(path: Path, workdir: Path, name: str) -> tuple[int, int, int]:
    """(records, accepted, rejected) of the job's first step on a file; raises what it raises."""
    plan = begin_run(str(path), LocalStore(workdir / f"store-{name}"), "poison", POISON_CFG, n_model_layers=4)
    return plan.prepared.n_input, len(plan.prepared.users), len(plan.prepared.rejects)


def check_poison_input(workdir: Path, args) -> dict[str, int | float]:
    files: list[tuple[str, Path, int]] = []  # (name, path, records written)
    good = [GOOD_KINDS[i % len(GOOD_KINDS)].make(f"good-{i}", f"text {i}") for i in range(args.users)]
    bad = [k.make(f"bad-{i}", "poison") for i, k in enumerate(MALFORMED_KINDS)]
    lines = good + bad
    jsonl = workdir / "users.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\n")
    files.append(("jsonl", jsonl, len(lines)))
    elements = good + [k.make(f"bad-{i}", "poison") for i, k in enumerate(MALFORMED_KINDS) if k.json_element]
    lamp = workdir / "questions.json"
    lamp.write_bytes(b"[" + b",\n".join(elements) + b"]")
    files.append(("lamp_json", lamp, len(elements)))
    for kind in PARQUET_KINDS:
        path = workdir / f"{kind.name}.parquet"
        ids = [f"{kind.name}-{i}" for i in range(5)]
        pq.write_table(kind.make(ids, [f"text {i}" for i in range(5)]), path)
        files.append((kind.name, path, 5))
    records = accepted = rejected = crashes = lost = 0
    for name, path, n in files:
        try:
            n_input, acc, rej = _begin(path, workdir, name)
        except ValueError as exc:
            if "no valid user records" not in str(exc):
                crashes += 1
                continue
            prepared = prepare_input(str(path), POISON_CFG)  # all rejected: still accounted for?
            n_input, acc, rej = prepared.n_input, len(prepared.users), len(prepared.rejects)
        except Exception:
            crashes += 1
            continue
        records += n
        accepted += acc
        rejected += rej
        lost += abs(n - (acc + rej)) + abs(n - n_input)
    return {
        "files": len(files),
        "malformed_kinds": len(MALFORMED_KINDS) + sum(not k.accepted for k in PARQUET_KINDS),
        "records": records,
        "accepted": accepted,
        "rejected": rejected,
        "crashes": crashes,
        "records_lost": lost,
    }


# -- synthetic runs (random pairs, no model) -----------------------------------------------------


def _synthetic_users(n: int, K: int, L: int, d: int, seed: int, groups: list[str] | None = None):
    g = torch.Generator().manual_seed(seed)
    styles = torch.randn(8, 21, generator=g)
    for i in range(n):
        uid = f"user-{seed}-{i:06d}"
        yield UserPairs(
            user_id=uid,
            group_id=groups[i % len(groups)] if groups else None,
            selected=list(range(K)),
            history_embedding=torch.randn(d, generator=g),
            insight_p="p",
            insight_n="n",
            queries=[f"query {uid} {k}" for k in range(K)],
            personalized=[f"answer of {uid} number {k}" for k in range(K)],
            neutral=[f"neutral {k}" for k in range(K)],
            emb_p=torch.randn(K, L, d, generator=g) + 1.0,
            emb_n=torch.randn(K, L, d, generator=g),
            heldout_queries=[f"held-out query {uid}"],
            heldout_texts=[f"held-out text {uid}"],
            style_features=styles[i % 8] + 0.1 * torch.randn(21, generator=g),
        )


def _fingerprint(d: int, L: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)  # fmt: skip
    return fingerprint_model(LlamaForCausalLM(cfg).eval(), "random-llama")


def _bench_cfg(args, **overrides) -> ChameleonConfig:
    base = {
        "edit.calibrate": False,
        "subspace.ccs_steps": args.ccs_steps,
        "subspace.ccs_restarts": 2,
        "job.users_per_partition": 64,
    }
    return ChameleonConfig().with_overrides({**base, **overrides})


def write_synthetic_run(
    store: LocalStore, run_id: str, n_users: int, args, seed: int = 0, cfg: ChameleonConfig | None = None
) -> tuple[int, dict]:
    """Partitions of random pairs in a run that is still open; returns (partitions, counts). With
    `cfg`, each partition also stores its users' own reduce, as the map stage does."""
    writer = RunWriter(store, run_id)
    writer.put_jsonl("rejects.jsonl", [])
    size = 64
    users = _synthetic_users(n_users, args.pairs, args.layers, args.hidden, seed)
    n_parts = 0
    while True:
        part = [u for _, u in zip(range(size), users, strict=False)]
        if not part:
            break
        pairs, profiles = pairs_to_tables(part)
        if cfg is not None:
            data = tables_to_units(pairs, profiles, args.layers)
            red = reduce_users(data, reduce_subspace_config(cfg), list(range(args.layers)))
            profiles = attach_user_reduce(profiles, data, red, cfg, list(range(args.layers)))
        write_partition(writer, n_parts, pairs, profiles, [])
        n_parts += 1
    counts = {"records": n_users, "accepted": n_users, "rejected": 0, "partitions": n_parts}
    return n_parts, counts


def check_forget(workdir: Path, args) -> dict[str, int | float]:
    store = LocalStore(workdir / "forget-store")
    cfg = _bench_cfg(args)
    n_parts, counts = write_synthetic_run(store, "before", args.users, args)
    layers = list(range(args.layers))
    fp = _fingerprint(args.hidden, args.layers)
    writer = RunWriter(store, "before")
    for k in range(n_parts):
        for key in (
            f"profiles/part-{k:05d}.parquet",
            f"failures/part-{k:05d}.jsonl",
            f"pairs/part-{k:05d}.parquet",
        ):
            writer.record_existing(key)
    writer.record_existing("rejects.jsonl")
    reduce_and_publish(
        writer, cfg=cfg, layers=layers, fingerprint=fp, n_partitions=n_parts, counts=counts, timings={}
    )
    victim = "user-0-000007"
    needles = [victim.encode(), f"answer of {victim}".encode(), f"held-out text {victim}".encode()]

    def found(run_id: str) -> int:
        hits = 0
        for key in store.list(f"runs/{run_id}/"):
            data = store.get_bytes(key)
            if key.endswith(".parquet"):
                data += json.dumps(read_parquet_bytes(data).to_pylist(), default=repr).encode()
            hits += sum(n in data for n in needles)
        return hits

    before = found("before")
    t0 = time.perf_counter()
    res = forget_users(store, [victim], new_run="after", delete_old=True)
    return {
        "user_bytes_found_before": before,
        "runs_deleted": len(res.deleted),
        "forget_call_s": round(time.perf_counter() - t0, 2),
        "user_bytes_found": found("after"),
    }


def check_groups(workdir: Path, args) -> dict[str, int | float]:
    names = ["big_a"] * 6 + ["big_b"] * 6 + ["solo"] + ["thin"] * 3
    users = list(_synthetic_users(len(names), args.pairs, args.layers, args.hidden, seed=3, groups=names))
    for u in users[-2:]:  # two members of `thin` with one pair: no edit of their own
        u.queries, u.personalized, u.neutral = u.queries[:1], u.personalized[:1], u.neutral[:1]
        u.emb_p, u.emb_n = u.emb_p[:1], u.emb_n[:1]
    below = unpublished = 0
    layers = list(range(args.layers))
    for policy in ("merge", "drop"):
        cfg = _bench_cfg(args, **{"groups.group_column": "group_id", "groups.small_groups": policy})
        g = reduce_all(*pairs_to_tables(users), cfg, layers).grouping
        below += sum(c < cfg.groups.min_contributors for c in g.contributors)
        unpublished += len(g.unpublished)
        # Clustered groups obey the floor as well.
        cfg = _bench_cfg(
            args, **{"groups.small_groups": policy, "groups.n_groups": 6, "groups.min_group_size": 1}
        )
        g = reduce_all(*pairs_to_tables(users), cfg, layers).grouping
        below += sum(c < cfg.groups.min_contributors for c in g.contributors)
    return {"groups_unpublished": unpublished, "groups_below_min_contributors": below}


def _reduce_child(store_dir: str, run_id: str, args) -> None:
    """In a fresh process: reduce and publish a stored run; print its peak RSS (MiB)."""
    store = LocalStore(store_dir)
    meta = json.loads((Path(store_dir) / "meta.json").read_text())
    fp = _fingerprint(args.hidden, args.layers)
    writer = RunWriter(store, run_id)
    for key in store.list(f"runs/{run_id}/"):
        writer.record_existing(key.removeprefix(f"runs/{run_id}/"))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    reduce_and_publish(
        writer,
        cfg=_bench_cfg(args),
        layers=list(range(args.layers)),
        fingerprint=fp,
        n_partitions=meta["partitions"],
        counts=meta["counts"],
        timings={},
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "before_reduce_mb": base, "seconds": time.perf_counter() - t0}))


def check_driver_memory(workdir: Path, args) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    peaks = []
    for n in [int(x) for x in args.mem_sizes.split(",")]:
        store_dir = workdir / f"mem-{n}"
        store = LocalStore(store_dir)
        n_parts, counts = write_synthetic_run(store, "mem", n, args, cfg=_bench_cfg(args))
        (store_dir / "meta.json").write_text(json.dumps({"partitions": n_parts, "counts": counts}))
        cmd = [sys.executable, __file__, "--reduce-child", str(store_dir), *_shape_flags(args)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"reduce of {n} users failed:\n{res.stderr[-3000:]}")
        fig = json.loads(res.stdout.strip().splitlines()[-1])
        out[f"driver_peak_mb_{n}"] = round(fig["peak_mb"], 1)
        out[f"driver_reduce_growth_mb_{n}"] = round(fig["peak_mb"] - fig["before_reduce_mb"], 1)
        out[f"reduce_s_{n}"] = round(fig["seconds"], 1)
        peaks.append(fig["peak_mb"])
    out["driver_memory_ratio"] = round(peaks[-1] / peaks[0], 3)
    return out


def _shape_flags(args) -> list[str]:
    return [
        f"--hidden={args.hidden}",
        f"--layers={args.layers}",
        f"--pairs={args.pairs}",
        f"--ccs-steps={args.ccs_steps}",
    ]


CHECKS = {
    "poison_input": check_poison_input,
    "forget": check_forget,
    "groups": check_groups,
    "driver_memory": check_driver_memory,
}
HEADLINES = ["records_lost", "user_bytes_found", "groups_below_min_contributors", "driver_memory_ratio"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--only", help=f"comma-separated checks (default: all of {', '.join(CHECKS)})")
    p.add_argument("--workdir", default="bench-out/job-integrity", help="scratch directory")
    p.add_argument("--users", type=int, default=100, help="good users of poison_input and forget")
    p.add_argument("--mem-sizes", default="1000,10000", help="user counts of driver_memory")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the random pairs")
    p.add_argument("--layers", type=int, default=6, help="captured layers of the random pairs")
    p.add_argument("--pairs", type=int, default=8, help="pairs per user")
    p.add_argument("--ccs-steps", type=int, default=100, help="CCS steps of the reduce")
    p.add_argument("--reduce-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reduce_child:
        _reduce_child(args.reduce_child, "mem", args)
        return
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"unknown checks {unknown}; choose from {list(CHECKS)}")
    figures: dict[str, int | float] = {}
    for name in names:
        workdir = Path(args.workdir) / name
        shutil.rmtree(workdir, ignore_errors=True)  # runs are immutable: start each check afresh
        workdir.mkdir(parents=True)
        t0 = time.perf_counter()
        figures.update(CHECKS[name](workdir, args))
        figures[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    headline = next((h for h in reversed(HEADLINES) if h in figures), next(iter(figures)))
    report(figures, headline, args.out)


if __name__ == "__main__":
    main()
