"""`chameleon serve`: the OpenAI-compatible endpoint on Ray Serve, from the command line.

    chameleon serve --store s3://bucket/prefix [--run latest] [--model ID] [--port 8000] ...
    chameleon serve                       # the embedded store the demo wrote (demo-out/s3)

Starts a local Ray (or joins `--address` / `RAY_ADDRESS`), starts Serve's HTTP proxy on
`--host:--port`, deploys `chameleon.serving.app.build_app` and blocks until Ctrl-C. Without
`--store` it restarts the embedded S3 server on the data that `chameleon demo` and
`chameleon personalize` (without --store) keep under `--workdir`, and serves its runs. `--config`
takes a YAML mapping of `ServeConfig` fields (the same keys as the `args:` of
`cluster/serve-config.yaml`); flags override single fields. For a cluster,
`serve deploy cluster/serve-config.yaml` is the declarative route; this command is the quick one.

Ray and the Serve app are imported only when the command runs, so `chameleon --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from chameleon.flags import Flag, add_flags, auto_or, flag_overrides
from chameleon.ray_env import quiet_console, ray_init_kwargs
from chameleon.serving.access import api_key
from chameleon.serving.config import ServeConfig

log = logging.getLogger("chameleon")

DEFAULT_WORKDIR = "demo-out"
"""Where `chameleon demo`, `chameleon personalize` (without --store) and `chameleon serve` (without
--store) keep and find the embedded store (`<workdir>/s3`) and the example users."""

SERVE_FLAGS: tuple[Flag, ...] = (
    Flag(
        "store",
        "where runs are published: s3://bucket/prefix or a local dir (unset here and in --config: "
        "the embedded store under --workdir that the demo wrote)",
    ),
    Flag(
        "s3_endpoint",
        "S3-compatible endpoint URL (else CHAMELEON_S3_ENDPOINT / AWS_ENDPOINT_URL)",
    ),
    Flag("run", "run id to serve, or `latest` to follow the store's pointer"),
    Flag(
        "model.name_or_path",
        "base model id or path (unset: the model recorded in the manifest of the run served)",
        name="--model",
    ),
    Flag("model.revision", "hub revision of the model (unset: the run's, with its model)"),
    Flag(
        "model.dtype",
        "weights dtype (unset: the run's; auto: float32 on CPU, bfloat16 on GPU)",
        choices=("auto", "float32", "bfloat16", "float16"),
    ),
    Flag("model.device", "auto | cpu | cuda | cuda:N (ignored with --device-map)"),
    Flag("model.device_map", "e.g. `auto` to shard one replica's model over its GPUs"),
    Flag("served_model_name", "the `model` clients send (unset: the model's name)"),
    Flag(
        "api_key_env",
        "env var holding the bearer token (unset or empty: the server refuses to start, "
        "unless --allow-unauthenticated)",
    ),
    Flag(
        "personalization_detail",
        "what responses tell about personalization: minimal (only what the caller sent) or full",
        choices=("minimal", "full"),
    ),
    Flag("model.cache_dir", "where the embedded model is converted to safetensors once"),
    Flag("model.trust_remote_code", "run the model repo's own code (transformers)", bool),
    Flag("max_batch_size", "rows the decode loop runs together (its running batch)", int),
    Flag(
        "stream_interval_s",
        "a stream's tokens after the first are gathered this long per message (0: every token)",
        float,
    ),
    Flag("log_requests", "one JSON log line per finished request", bool),
    Flag("max_prefill_tokens", "prefill token budget of one engine step", int),
    Flag(
        "engine_stall_timeout_s",
        "health fails when requests wait and no decode step finished for this long",
        float,
    ),
    Flag("edit_cache_size", "group edits resident per replica", int),
    Flag("max_prompt_tokens", "longer prompts get 400", int),
    Flag("max_tokens_limit", "largest max_tokens a request may ask", int),
    Flag("default_max_tokens", "max_tokens when a request gives none", int),
    Flag("max_request_bytes", "larger bodies get 413", int),
    Flag("fallback", "users without an assignment: `base` or `group:<id>`"),
    Flag("refresh_interval_s", "how often `latest` is checked, in seconds", float),
    Flag(
        "admission_timeout_s",
        "deadline for loading a request's edit and getting an edit row (then 503 + Retry-After)",
        float,
    ),
    Flag("edit_load_workers", "threads per replica reading edits from the store", int),
    Flag("edit_failure_ttl_s", "how long a failed edit load is remembered", float),
    Flag("retry_after_s", "Retry-After of 503 answers", int),
    Flag("max_queued_requests", "queued requests per caller; then 503", int),
    Flag("request_timeout_s", "longer requests end with 408", float),
    Flag("max_prompt_chars", "longer prompts get 400 before tokenizing", int),
    Flag("health_check_period_s", "how often Serve checks a model replica", float),
    Flag(
        "health_check_timeout_s",
        "a model replica whose device does not answer within this is restarted",
        float,
    ),
    Flag(
        "graceful_shutdown_timeout_s",
        "how long a stopping replica lets requests in flight finish",
        float,
    ),
    Flag("num_replicas", "model replicas", int),
    Flag(
        "num_gpus",
        "GPUs per model replica (auto: 1 when the cluster has GPUs, else CPU; a fraction shares a GPU)",
        auto_or(float),
    ),
    Flag("num_cpus", "CPUs per model replica; torch threads on CPU", float),
    Flag("max_ongoing_requests", "concurrent requests per replica", int),
)
"""Flag -> `ServeConfig` setting (dotted inside `model`). Defaults live in ServeConfig."""

EXAMPLES = """\
examples:
  # the demo's run (`make demo` first): the embedded store under demo-out, on this machine's CPU
  chameleon serve
  # the latest run of an S3 store, on this machine's GPU
  chameleon serve --store s3://bucket/prefix
  # one pinned run of a local store on port 8080, bearer token from $MY_KEY
  chameleon serve --store ./store --run 20250101T000000Z-a1b2c3 --port 8080 --api-key-env MY_KEY
  # the settings of a YAML file, deployed to a running cluster (the app keeps running)
  chameleon serve --config serve.yaml --address auto --detach
"""


def add_serve_parser(
    sub: argparse._SubParsersAction, embedded_store: EmbeddedStore | None = None
) -> argparse.ArgumentParser:
    """Add `serve` to a subparsers object (`chameleon.cli.build_parser` calls this, passing the
    embedded store that serves `--workdir` without `--store`)."""
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
        "--allow-unauthenticated",
        action="store_true",
        help="serve without a bearer token when the key variable is unset or empty (otherwise the "
        "server refuses to start) [default: off]",
    )
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
        "--workdir",
        default=DEFAULT_WORKDIR,
        help="without --store: serve the embedded store kept under this dir by `chameleon demo` / "
        "`chameleon personalize` [default: %(default)s]",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="deploy and return; needs --address, the app keeps running [default: off]",
    )
    p.set_defaults(func=partial(cmd_serve, embedded_store=embedded_store))
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


def serve_settings(args: argparse.Namespace, default_store: str | None = None) -> dict[str, Any]:
    """ServeConfig fields from --config, then the flags (`default_store` when neither names one)."""
    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping of ServeConfig fields")
        settings.update(data)
    for dotted, value in flag_overrides(args, SERVE_FLAGS).items():
        _set_dotted(settings, dotted, value)
    if getattr(args, "allow_unauthenticated", False):
        settings["allow_unauthenticated"] = True
    if "store" not in settings and default_store is not None:
        settings["store"] = default_store
    if "store" not in settings:
        raise ValueError("serve needs --store (or `store:` in --config): where the runs are published")
    return settings


def has_store(args: argparse.Namespace) -> bool:
    """Whether --store or the --config file names a store."""
    if getattr(args, "store", None):
        return True
    if getattr(args, "config", None):
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        return isinstance(data, dict) and "store" in data
    return False


def run_server(
    cfg: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ray_num_cpus: int | None = None,
    app_name: str = "chameleon",
    detach: bool = False,
    store: Any = None,
) -> int:
    """Start Ray (or join `address` / RAY_ADDRESS), deploy the app, and serve until Ctrl-C or
    SIGTERM (or return at once with `detach` on a running cluster). `store`: a ready store object
    (one with keys, e.g. the embedded one) instead of opening `cfg.store` on each replica."""
    # Heavy on purpose and only here: Ray, Serve, FastAPI and torch load when the command runs.
    import ray
    from ray import serve

    from chameleon.serving.app import build_app

    address = address or os.environ.get("RAY_ADDRESS")
    # Fail closed before anything starts (the ingress replicas check again in their environment).
    key = api_key(cfg)
    if detach and not address:
        raise ValueError(
            "--detach needs a running cluster (--address or RAY_ADDRESS): a local Ray ends with this process"
        )
    if quiet_console():  # Serve's own lines in this process (its replicas' logs stay in Ray's files)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    owns_ray = not ray.is_initialized()
    started_local = False
    if owns_ray:
        init = ray_init_kwargs(address, num_cpus=ray_num_cpus, ray_data=False)
        ray.init(**init)
        started_local = init["address"] == "local"
    started = time.perf_counter()
    try:
        # The proxy's own limit sits just above the app's, which answers 408 with a clear body.
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s + 5})
        serve.run(build_app(cfg, store=store), name=app_name, route_prefix="/")
        url = f"http://{host}:{port}"
        auth = f"bearer token from ${cfg.api_key_env}" if key else "NO AUTH (--allow-unauthenticated)"
        print(
            f"serving model {cfg.model_name!r} (the `model` clients send) at {url}/v1 ({auth}); "
            f"{_serving_run(app_name, cfg)}; health: {url}/healthz; "
            f"ready in {time.perf_counter() - started:.0f} s",
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
            # A local Ray of our own goes down whole with ray.shutdown() (stopping Serve first
            # only makes its controller's retries complain); on a cluster, remove just our app.
            if not started_local:
                serve.delete(app_name)
            if owns_ray:
                ray.shutdown()


def _serving_run(app_name: str, cfg: ServeConfig) -> str:
    """What the replica serves right now, for the ready line."""
    from ray import serve

    try:
        health = serve.get_deployment_handle("ChameleonServer", app_name=app_name).health.remote().result()
    except Exception as exc:  # the line is informative only
        return f"run {cfg.run!r} of {cfg.store} (status unknown: {type(exc).__name__})"
    run = health.get("run") or {}
    if not run:
        why = "; ".join(health.get("problems") or []) or "no run loaded"
        return f"no run of {cfg.store} yet ({why}); only personalization.off requests are served"
    return (
        f"run {run['run_id']} of {cfg.store} ({run['users']} users, {run['groups']} groups; "
        f"following {cfg.run!r})"
    )


EmbeddedStore = Callable[[Path], AbstractContextManager[Any]]
"""workdir -> a context manager yielding the store kept there (`chameleon.cli.demo_store`: the
dev layer's embedded S3 server, which serving does not import)."""


def cmd_serve(args: argparse.Namespace, embedded_store: EmbeddedStore | None = None) -> int:
    from chameleon.serving.run_model import with_run_model  # reads stores: torch, boto3

    with contextlib.ExitStack() as stack:
        store = None
        if not has_store(args):
            if args.detach:
                raise ValueError("--detach needs --store: the embedded store stops with this process")
            if embedded_store is None:
                raise ValueError("no --store given (this entry point has no embedded store)")
            store = stack.enter_context(embedded_store(Path(args.workdir)))
        cfg = ServeConfig.model_validate(serve_settings(args, default_store=store.uri if store else None))
        cfg, source = with_run_model(cfg, store)
        print(f"base model: {cfg.model.name_or_path} ({source})", flush=True)
        return run_server(
            cfg,
            host=args.host,
            port=args.port,
            address=args.address,
            ray_num_cpus=args.ray_num_cpus,
            app_name=args.app_name,
            detach=args.detach,
            store=store,
        )
