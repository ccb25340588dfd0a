"""`chameleon personalize | demo | serve | eval` — thin wrappers over the library.

Ray and the heavy libraries are imported lazily so `chameleon --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from chameleon.config import ChameleonConfig
from chameleon.eval_cli import add_eval_parser
from chameleon.serving_cli import add_serve_parser

log = logging.getLogger("chameleon")

# Flags that override single config fields: flag -> dotted setting.
OVERRIDES = {
    "model": "model.name_or_path",
    "dtype": "model.dtype",
    "device_map": "model.device_map",
    "pairs_per_user": "synth.pairs_per_user",
    "history_k": "synth.history_k",
    "max_new_tokens": "synth.answer_max_new_tokens",
    "batch_size": "synth.batch_size",
    "seed": "synth.seed",
    "site": "subspace.site",
    "n_layers": "subspace.n_layers",
    "n_groups": "groups.n_groups",
    "min_group_size": "groups.min_group_size",
    "group_column": "groups.group_column",
    "num_actors": "job.num_actors",
    "num_gpus_per_actor": "job.num_gpus_per_actor",
    "users_per_partition": "job.users_per_partition",
}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with config sections (see cluster/job-config.example.yaml)")
    p.add_argument("--model", help="Hugging Face model id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device-map", help="e.g. `auto` to shard one replica over the GPUs of a node")
    p.add_argument("--pairs-per-user", type=int)
    p.add_argument("--history-k", type=int)
    p.add_argument("--max-new-tokens", type=int, help="token budget of each synthetic answer")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--site", choices=["mlp", "residual"])
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-groups", type=int)
    p.add_argument("--min-group-size", type=int)
    p.add_argument("--group-column")
    p.add_argument("--num-actors", type=int)
    p.add_argument("--num-gpus-per-actor", type=float)
    p.add_argument("--users-per-partition", type=int)


def load_config(args: argparse.Namespace) -> ChameleonConfig:
    cfg = ChameleonConfig.from_yaml(args.config) if args.config else ChameleonConfig()
    return cfg.with_overrides({dotted: getattr(args, flag, None) for flag, dotted in OVERRIDES.items()})


def s3_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"endpoint_url": args.s3_endpoint} if getattr(args, "s3_endpoint", None) else {}


@contextlib.contextmanager
def embedded_store(root: Path):
    """A SeaweedFS on loopback whose data lives under `root` (kept between runs)."""
    from chameleon.s3server import LocalS3Server  # noqa: PLC0415

    root.mkdir(parents=True, exist_ok=True)
    with LocalS3Server(data_dir=root / "s3", access_key="chameleon-demo", secret_key="chameleon-demo-secret") as s3:
        log.info("embedded S3-compatible server at %s (data in %s)", s3.endpoint_url, root / "s3")
        yield s3, s3.store("chameleon", "demo")


def _run_job(args: argparse.Namespace, cfg: ChameleonConfig, store, input_uri: str) -> dict[str, Any]:
    from chameleon.artifacts import new_run_id  # noqa: PLC0415

    run_id = args.run_id or new_run_id("run")
    if args.local:
        from chameleon.local import run_local  # noqa: PLC0415

        return run_local(input_uri, store, run_id, cfg, **s3_options(args))
    from chameleon.pipeline import run_ray_job  # noqa: PLC0415

    return run_ray_job(input_uri, store, run_id, cfg, address=args.address, **s3_options(args))


def print_summary(manifest: dict[str, Any], store_uri: str) -> None:
    c = manifest["counts"]
    print(
        f"\nrun {manifest['run_id']}: {c['accepted']} users accepted, {c['rejected']} rejected, "
        f"{c['users_failed']} failed in the map stage, {c['users_with_edit']} with their own edit, "
        f"{c['groups']} groups, {c['pairs_kept']}/{c['pairs']} pairs kept"
    )
    print("time per stage: " + ", ".join(f"{k}={v:.1f}" for k, v in manifest["timings_s"].items()))
    print(f"artifacts: {store_uri.rstrip('/')}/runs/{manifest['run_id']}/ (manifest.json, latest updated)")


def cmd_personalize(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.store:
        from chameleon.storage import open_store  # noqa: PLC0415

        store = open_store(args.store, **s3_options(args))
        manifest = _run_job(args, cfg, store, args.input)
        print_summary(manifest, store.uri)
        return 0
    with embedded_store(Path(args.workdir)) as (s3, store):
        os.environ.setdefault("AWS_ENDPOINT_URL", s3.endpoint_url)
        manifest = _run_job(args, cfg, store, args.input)
        print_summary(manifest, store.uri)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from chameleon.artifacts import RunReader, new_run_id  # noqa: PLC0415
    from chameleon.demo import example_users, write_example_users  # noqa: PLC0415
    from chameleon.inference import personalized_generate  # noqa: PLC0415
    from chameleon.model import load_model  # noqa: PLC0415
    from chameleon.runs import PublishedRun  # noqa: PLC0415

    workdir = Path(args.workdir)
    users_file = write_example_users(workdir / "example_users.jsonl")
    print(f"example users: {users_file} ({len(example_users())} users, 6 writing styles)")
    cfg = load_config(args)
    if args.quick:
        cfg = cfg.with_overrides({"synth.pairs_per_user": 4, "synth.answer_max_new_tokens": 24, "synth.insight_max_new_tokens": 40})
    # One replica on this machine: let it use every core (Ray would give it one thread).
    cfg = cfg.with_overrides({"groups.n_groups": 6, "groups.min_group_size": 2, "job.torch_threads": os.cpu_count() or 1})
    args.run_id = args.run_id or new_run_id("demo")
    t0 = time.perf_counter()
    with embedded_store(workdir) as (s3, store):
        os.environ.setdefault("AWS_ENDPOINT_URL", s3.endpoint_url)
        manifest = _run_job(args, cfg, store, str(users_file))
        print_summary(manifest, store.uri)
        run = PublishedRun(RunReader(store, manifest["run_id"]))
        model, tok = load_model(cfg.model)
        shown = [u for u in example_users() if u["user_id"].endswith("-1")]
        ids, queries = [u["user_id"] for u in shown], [u["query"] for u in shown]
        base = personalized_generate(model, tok, run, ids, queries, level="none", max_new_tokens=40)
        group = personalized_generate(model, tok, run, ids, queries, level="group", max_new_tokens=40)
        for uid, q, b, g in zip(ids, queries, base, group, strict=True):
            print(f"\n== {uid} (group {run.user_group(uid)}) — {q}")
            print(f"   base:         {b.splitlines()[0] if b else ''}")
            print(f"   personalized: {g.splitlines()[0] if g else ''}")
        print(f"\nartifacts: {store.uri}/runs/{manifest['run_id']}/ on the embedded S3 server "
              f"(data under {workdir / 's3'}); total {time.perf_counter() - t0:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chameleon", description="CHAMELEON personalization on Ray")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("personalize", help="run the personalization job (Ray, or --local in-process)")
    p.add_argument("--input", required=True, help="users file: .jsonl, .json (LaMP questions) or .parquet; local or s3://")
    p.add_argument("--store", help="output store: s3://bucket/prefix or a local dir (default: an embedded S3 server)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL / CHAMELEON_S3_ENDPOINT)")
    p.add_argument("--run-id", help="run id (default: a new one); rerun with the same id to resume")
    p.add_argument("--address", help="Ray cluster address (`auto` = the running cluster; default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--local", action="store_true", help="run in this process without Ray")
    p.add_argument("--workdir", default="demo-out", help="data dir of the embedded S3 server")
    add_config_flags(p)
    p.set_defaults(func=cmd_personalize)

    p = sub.add_parser("demo", help="run the job on example users and show base vs personalized answers")
    p.add_argument("--workdir", default="demo-out")
    p.add_argument("--run-id")
    p.add_argument("--address")
    p.add_argument("--local", action="store_true", help="skip Ray (in-process job)")
    p.add_argument("--quick", action="store_true", help="fewer pairs and shorter answers")
    add_config_flags(p)
    p.set_defaults(func=cmd_demo)

    add_serve_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"chameleon: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

