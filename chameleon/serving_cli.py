"""`chameleon serve`: the OpenAI-compatible endpoint on Ray Serve, from the command line.

    chameleon serve --store s3://bucket/prefix [--run latest] [--model ID] [--port 8000] ...

Starts a local Ray (or joins `--address` / `RAY_ADDRESS`), starts Serve's HTTP proxy on
`--host:--port`, deploys `chameleon.serving.build_app` and blocks until Ctrl-C. `--config` takes a
YAML mapping of `ServeConfig` fields (the same keys as the `args:` of `cluster/serve-config.yaml`);
flags override single fields. For a cluster, `serve deploy cluster/serve-config.yaml` is the
declarative route; this command is the quick one.

Ray and the serving module are imported only when the command runs, so `chameleon --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("chameleon")

# flag -> (ServeConfig field, type, help). Defaults live in ServeConfig (flags default to None).
FLAGS: dict[str, tuple[str, type, str]] = {
    "--store": ("store", str, "where runs are published: s3://bucket/prefix or a local dir (required here or in --config)"),
    "--s3-endpoint": ("s3_endpoint", str, "S3-compatible endpoint URL (else CHAMELEON_S3_ENDPOINT / AWS_ENDPOINT_URL)"),
    "--run": ("run", str, "run id to serve, or `latest` to follow the store's pointer (default latest)"),
    "--model": ("model", str, "base model id or path; the model the run was computed on (default: the embedded SmolLM2-135M-Instruct)"),
    "--dtype": ("dtype", str, "auto | float32 | bfloat16 | float16"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N"),
    "--served-model-name": ("served_model_name", str, "the `model` clients send (default: the model's name)"),
    "--api-key-env": ("api_key_env", str, "env var holding the bearer token (default CHAMELEON_API_KEY; unset = no auth)"),
    "--max-batch-size": ("max_batch_size", int, "requests per @serve.batch (default 32)"),
    "--batch-wait-timeout-s": ("batch_wait_timeout_s", float, "how long a batch waits to fill (default 0.01)"),
    "--edit-cache-size": ("edit_cache_size", int, "group edits resident per replica (default 256)"),
    "--max-prompt-tokens": ("max_prompt_tokens", int, "longer prompts get 400 (default 4096)"),
    "--max-tokens-limit": ("max_tokens_limit", int, "largest max_tokens a request may ask (default 1024)"),
    "--default-max-tokens": ("default_max_tokens", int, "max_tokens when a request gives none (default 256)"),
    "--max-request-bytes": ("max_request_bytes", int, "larger bodies get 413 (default 1 MiB)"),
    "--fallback": ("fallback", str, "unknown users: `base` or `group:<id>` (default base)"),
    "--refresh-interval-s": ("refresh_interval_s", float, "how often `latest` is checked (default 30)"),
    "--num-replicas": ("num_replicas", int, "model replicas (default 1)"),
    "--num-gpus": ("num_gpus", float, "GPUs per model replica (default 0)"),
    "--num-cpus": ("num_cpus", float, "CPUs per model replica; torch threads on CPU (default 1)"),
}


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `serve` to a subparsers object (`chameleon.cli.build_parser` calls this)."""
    p = sub.add_parser(
        "serve",
        help="serve published edits over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Serve a published run's group edits behind /v1/chat/completions, /v1/completions, "
        "/v1/models and /healthz. The `user` field picks the user's group; "
        'extra_body={"personalization": {"group_id": ..., "off": true}} overrides it.',
    )
    p.add_argument("--config", help="YAML mapping of ServeConfig fields (the `args:` of cluster/serve-config.yaml)")
    for flag, (_field, typ, help_) in FLAGS.items():
        p.add_argument(flag, type=typ, help=help_)
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--ray-num-cpus", type=int, help="CPUs of a new local Ray (default: all)")
    p.add_argument("--app-name", default="chameleon", help="Serve application name (default chameleon)")
    p.add_argument("--detach", action="store_true", help="deploy and return (with --address: the app keeps running)")
    p.set_defaults(func=cmd_serve)
    return p


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ServeConfig fields from --config, then the flags."""
    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml  # noqa: PLC0415

        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping of ServeConfig fields")
        settings.update(data)
    for _flag, (name, _typ, _help) in FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if "store" not in settings:
        raise ValueError("serve needs --store (or `store:` in --config): where the runs are published")
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from chameleon.serving import ServeConfig, run_server  # noqa: PLC0415 (Ray loads only here)

    cfg = ServeConfig.model_validate(serve_settings(args))
    return run_server(
        cfg, host=args.host, port=args.port, address=args.address, ray_num_cpus=args.ray_num_cpus,
        app_name=args.app_name, detach=args.detach,
    )


def main(argv: list[str] | None = None) -> int:
    """`python jobs/serve.py ...`: the `serve` command alone."""
    parser = argparse.ArgumentParser(prog="chameleon")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"chameleon serve: error: {exc}", file=sys.stderr)
        return 2
