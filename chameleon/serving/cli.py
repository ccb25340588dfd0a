"""`chameleon serve`: the OpenAI-compatible endpoint on Ray Serve, from the command line.

    chameleon serve --store s3://bucket/prefix [--run latest] [--model ID] [--port 8000] ...

Starts a local Ray (or joins `--address` / `RAY_ADDRESS`), starts Serve's HTTP proxy on
`--host:--port`, deploys `chameleon.serving.app.build_app` and blocks until Ctrl-C. `--config`
takes a YAML mapping of `ServeConfig` fields (the same keys as the `args:` of
`cluster/serve-config.yaml`); flags override single fields. For a cluster,
`serve deploy cluster/serve-config.yaml` is the declarative route; this command is the quick one.

Ray and the Serve app are imported only when the command runs, so `chameleon --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from chameleon.flags import Flag, add_flags, flag_overrides
from chameleon.ray_env import init_ray
from chameleon.serving.config import ServeConfig

log = logging.getLogger("chameleon")

SERVE_FLAGS: tuple[Flag, ...] = (
    Flag(
        "--store",
        "store",
        "where runs are published: s3://bucket/prefix or a local dir (required here or in --config)",
    ),
    Flag(
        "--s3-endpoint",
        "s3_endpoint",
        "S3-compatible endpoint URL (else CHAMELEON_S3_ENDPOINT / AWS_ENDPOINT_URL)",
    ),
    Flag("--run", "run", "run id to serve, or `latest` to follow the store's pointer"),
    Flag("--model", "model.name_or_path", "base model id or path; the model the run was computed on"),
    Flag("--revision", "model.revision", "hub revision of the model"),
    Flag(
        "--dtype",
        "model.dtype",
        "weights dtype (auto: float32 on CPU, bfloat16 on GPU)",
        choices=("auto", "float32", "bfloat16", "float16"),
    ),
    Flag("--device", "model.device", "auto | cpu | cuda | cuda:N (ignored with --device-map)"),
    Flag("--device-map", "model.device_map", "e.g. `auto` to shard one replica's model over its GPUs"),
    Flag("--served-model-name", "served_model_name", "the `model` clients send (unset: the model's name)"),
    Flag(
        "--api-key-env", "api_key_env", "env var holding the bearer token (unset or empty variable: no auth)"
    ),
    Flag("--max-batch-size", "max_batch_size", "requests per @serve.batch", int),
    Flag("--batch-wait-timeout-s", "batch_wait_timeout_s", "how long a batch waits to fill", float),
    Flag("--edit-cache-size", "edit_cache_size", "group edits resident per replica", int),
    Flag("--max-prompt-tokens", "max_prompt_tokens", "longer prompts get 400", int),
    Flag("--max-tokens-limit", "max_tokens_limit", "largest max_tokens a request may ask", int),
    Flag("--default-max-tokens", "default_max_tokens", "max_tokens when a request gives none", int),
    Flag("--max-request-bytes", "max_request_bytes", "larger bodies get 413", int),
    Flag("--fallback", "fallback", "users without an assignment: `base` or `group:<id>`"),
    Flag("--refresh-interval-s", "refresh_interval_s", "how often `latest` is checked, in seconds", float),
    Flag(
        "--admission-timeout-s", "admission_timeout_s", "how long a request waits for a free edit row", float
    ),
    Flag("--num-replicas", "num_replicas", "model replicas", int),
    Flag("--num-gpus", "num_gpus", "GPUs per model replica", float),
    Flag("--num-cpus", "num_cpus", "CPUs per model replica; torch threads on CPU", float),
    Flag("--max-ongoing-requests", "max_ongoing_requests", "concurrent requests per replica", int),
)
"""Flag -> `ServeConfig` setting (dotted inside `model`). Defaults live in ServeConfig."""

EXAMPLES = """\
examples:
  # the latest run of an S3 store, on this machine's GPU
  chameleon serve --store s3://bucket/prefix --model Qwen/Qwen2.5-1.5B-Instruct --num-gpus 1
  # one pinned run of a local store on port 8080, bearer token from $MY_KEY
  chameleon serve --store ./store --run 20250101T000000Z-a1b2c3 --port 8080 --api-key-env MY_KEY
  # the settings of a YAML file, deployed to a running cluster (the app keeps running)
  chameleon serve --config serve.yaml --address auto --detach
"""


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `serve` to a subparsers object (`chameleon.cli.build_parser` calls this)."""
    p = sub.add_parser(
        "serve",
        help="serve published edits over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Serve a published run's group edits behind /v1/chat/completions, /v1/completions, "
        "/v1/models and /healthz. The `user` field picks the user's group; "
        'extra_body={"personalization": {"group_id": ..., "off": true}} overrides it.',
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="YAML mapping of ServeConfig fields (the `args:` of cluster/serve-config.yaml) [default: none]",
    )
    add_flags(p, SERVE_FLAGS, defaults=ServeConfig.model_construct(store=None))
    p.add_argument(
        "--host", default="127.0.0.1", help="HTTP bind address; 0.0.0.0 to expose [default: %(default)s]"
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port [default: %(default)s]")
    p.add_argument(
        "--address",
        help="Ray cluster address (`auto`: a running one) [default: RAY_ADDRESS, else a new local Ray]",
    )
    p.add_argument("--ray-num-cpus", type=int, help="CPUs of a new local Ray [default: all]")
    p.add_argument("--app-name", default="chameleon", help="Serve application name [default: %(default)s]")
    p.add_argument(
        "--detach",
        action="store_true",
        help="deploy and return; needs --address, the app keeps running [default: off]",
    )
    p.set_defaults(func=cmd_serve)
    return p


def _set_dotted(settings: dict[str, Any], dotted: str, value: Any) -> None:
    """settings[a][b] = value for `a.b` (a `model: <string>` becomes `{name_or_path: <string>}` first)."""
    section, _, key = dotted.partition(".")
    if not key:
        settings[section] = value
        return
    current = settings.get(section)
    if isinstance(current, str) and section == "model":
        current = {"name_or_path": current}
    settings[section] = {**(current if isinstance(current, dict) else {}), key: value}


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ServeConfig fields from --config, then the flags."""
    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping of ServeConfig fields")
        settings.update(data)
    for dotted, value in flag_overrides(args, SERVE_FLAGS).items():
        _set_dotted(settings, dotted, value)
    if "store" not in settings:
        raise ValueError("serve needs --store (or `store:` in --config): where the runs are published")
    return settings


def run_server(
    cfg: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ray_num_cpus: int | None = None,
    app_name: str = "chameleon",
    detach: bool = False,
) -> int:
    """Start Ray (or join `address` / RAY_ADDRESS), deploy the app, and serve until Ctrl-C or
    SIGTERM (or return at once with `detach` on a running cluster)."""
    # Heavy on purpose and only here: Ray, Serve, FastAPI and torch load when the command runs.
    import ray
    from ray import serve

    from chameleon.serving.app import build_app

    address = address or os.environ.get("RAY_ADDRESS")
    if detach and not address:
        raise ValueError(
            "--detach needs a running cluster (--address or RAY_ADDRESS): a local Ray ends with this process"
        )
    owns_ray = not ray.is_initialized()
    started_local = init_ray(address, num_cpus=ray_num_cpus)
    started = time.perf_counter()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name=app_name, route_prefix="/")
        url = f"http://{host}:{port}"
        auth = (
            f"bearer token from ${cfg.api_key_env}"
            if cfg.api_key_env and os.environ.get(cfg.api_key_env)
            else "no auth"
        )
        print(
            f"serving {cfg.model_name!r} with run {cfg.run!r} of {cfg.store} at {url}/v1 ({auth}); "
            f"health: {url}/healthz; ready in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        if detach:
            return 0
        print("Ctrl-C to stop", flush=True)
        # SIGTERM (Kubernetes, `kill`) cleans up like Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        if not detach:
            if started_local:
                serve.shutdown()
            else:
                serve.delete(app_name)
            if owns_ray:
                ray.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = ServeConfig.model_validate(serve_settings(args))
    return run_server(
        cfg,
        host=args.host,
        port=args.port,
        address=args.address,
        ray_num_cpus=args.ray_num_cpus,
        app_name=args.app_name,
        detach=args.detach,
    )


def main(argv: list[str] | None = None) -> int:
    """`python jobs/serve.py ...`: the `serve` command alone."""
    parser = argparse.ArgumentParser(prog="chameleon")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"chameleon serve: error: {exc}", file=sys.stderr)
        return 2
