"""`chameleon personalize | forget | demo | serve | eval`: one root parser and one `main`.

Heavy libraries (torch, Ray, transformers) are imported only when a command runs, so
`chameleon --help` is instant. Exit codes: 0 done; 1 the job ran and failed (too many failed
users, unfinished partitions); 2 a usage, input, configuration, storage or model problem, printed
as one `chameleon: error: …` line (add -v for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from chameleon import __version__
from chameleon.evaluation.cli import add_eval_parser
from chameleon.flags import add_config_flags, load_config
from chameleon.ray_env import set_local_env_defaults, set_quiet_console
from chameleon.serving.cli import DEFAULT_WORKDIR, add_serve_parser

log = logging.getLogger("chameleon")

VERBOSE_HELP = "log progress, show Ray's and the libraries' own output, and show tracebacks of errors"


def s3_options(args: argparse.Namespace, cfg: Any = None) -> dict[str, Any]:
    """S3 options from the flags and, given a config, its `storage` section."""
    options = dict(cfg.storage.s3_options()) if cfg is not None else {}
    if getattr(args, "s3_endpoint", None):
        options["endpoint_url"] = args.s3_endpoint
    return options


def _open_store(args: argparse.Namespace, stack: contextlib.ExitStack, cfg: Any = None) -> Any:
    """`--store`, else the embedded S3 server under `--workdir` (kept running until `stack` closes)."""
    if args.store:
        from chameleon.data.storage import open_store

        return open_store(args.store, **s3_options(args, cfg))
    from chameleon.dev.s3server import embedded_store

    s3, store = stack.enter_context(embedded_store(Path(args.workdir)))
    os.environ.setdefault("AWS_ENDPOINT_URL", s3.endpoint_url)
    return store


@contextlib.contextmanager
def demo_store(workdir: Path):
    """The embedded store under `workdir` (an S3 server on loopback, up while serving)."""
    from chameleon.dev.s3server import embedded_store

    if not (workdir / "s3").is_dir():
        raise ValueError(
            f"no --store given and no embedded store under {workdir / 's3'}: run `make demo` "
            "(or `chameleon personalize --input USERS.jsonl`) first, or pass --store"
        )
    with embedded_store(workdir) as (_s3, store):
        yield store


def cmd_personalize(args: argparse.Namespace) -> int:
    from chameleon.data.artifacts import new_run_id
    from chameleon.job.drivers import describe_run, run_job

    cfg = load_config(args)
    run_id = args.run_id or new_run_id("run")
    with contextlib.ExitStack() as stack:
        store = _open_store(args, stack, cfg)
        manifest = run_job(
            args.input,
            store,
            run_id,
            cfg,
            local=args.local,
            address=args.address,
            restart=args.restart,
            update_from=args.update_from,
            **s3_options(args, cfg),
        )
        print("\n" + describe_run(manifest, store.uri))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from chameleon.job.forget import forget_users, runs_holding

    with contextlib.ExitStack() as stack:
        store = _open_store(args, stack)
        if args.list:
            holding = runs_holding(store, args.user)
            for run_id, held in holding.items():
                state = "" if held.committed else " (no manifest: incomplete or half deleted)"
                print(f"{run_id}{state}: {', '.join(sorted(held.users))} in {len(held.keys)} objects")
            print(f"{len(holding)} runs hold {'these users' if len(args.user) > 1 else 'this user'}")
            return 0
        res = forget_users(
            store,
            args.user,
            source_run=args.run,
            new_run=args.new_run_id,
            delete_old=args.delete_old,
            single_writer=args.single_writer,
        )
    for run_id, held in res.holding.items():
        print(
            f"held by {run_id}{'' if held.committed else ' (no manifest)'}: {', '.join(sorted(held.users))}"
        )
    if res.manifest is not None:
        c = res.manifest.counts
        print(
            f"published run {res.new_run} from {res.source_run} without {len(args.user)} user(s): "
            f"{c.users_mapped} users, {c.groups} groups" + (" (latest updated)" if res.moved_latest else "")
        )
    elif res.source_run is not None:
        print(f"run {res.source_run} does not hold {'these users' if len(args.user) > 1 else 'this user'}")
    if res.deleted:
        print(f"deleted runs: {', '.join(res.deleted)}")
    if res.still_holding:
        print(f"still holding the users (pass --delete-old to delete them): {', '.join(res.still_holding)}")
    else:
        print("no run of the store holds them now")
    print("remove the users from the input users file too, or the next personalize run brings them back")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from chameleon.dev.demo import run_demo

    return run_demo(
        load_config(args),
        workdir=Path(args.workdir),
        run_id=args.run_id,
        local=args.local,
        address=args.address,
        quick=args.quick,
    )


_PERSONALIZE_EXAMPLES = """examples:
  chameleon personalize --input users.jsonl --local                 # in-process, embedded S3 store
  chameleon personalize --input s3://data/users.jsonl --store s3://runs/prod --address auto
  chameleon personalize --input users.jsonl --config job.yaml --run-id nightly-1   # rerun = resume
  chameleon personalize --input users.jsonl --run-id nightly-1 --restart   # start nightly-1 over
  chameleon personalize --input today.jsonl --update-from nightly-1 --run-id nightly-2   # refresh

A rerun with the same --run-id resumes only under the job spec the run was started with (config,
input, model, prompt version, partition size); otherwise it is refused, naming what differs.
"""


_FORGET_EXAMPLES = """examples:
  chameleon forget --user u17 --store s3://runs/prod --list          # which runs hold u17
  chameleon forget --user u17 u42 --store s3://runs/prod             # new run from latest without them
  chameleon forget --user u17 --store s3://runs/prod --delete-old    # ... then delete every run that held u17

An id matches as given and normalized (NFKC, no control or format characters, no surrounding
whitespace): `--user alice` also finds a reject of `"alice "`. Rejects match by their parsed id;
a line that was not JSON matches when it holds the id as a token. Every object of every run is
read, runs without a manifest included. Rerunning after a crash finishes the job.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chameleon",
        description="CHAMELEON personalization on Ray: personalize an LLM for many users without fine-tuning.",
        epilog="exit codes: 0 success, 1 the job failed, 2 usage / input / configuration / storage / model error",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "personalize",
        help="run the personalization job (Ray, or --local in-process)",
        description="Fake it, then align it: synthesize pairs for every user, compute user and group "
        "subspaces, and publish the edits to a store.",
        epilog=_PERSONALIZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        required=True,
        help="users file: .jsonl, .json (LaMP questions) or .parquet; local or s3://",
    )
    p.add_argument(
        "--store",
        help="output store: s3://bucket/prefix or a local dir (default: an embedded S3 server under --workdir)",
    )
    p.add_argument(
        "--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL / CHAMELEON_S3_ENDPOINT)"
    )
    p.add_argument("--run-id", help="run id (default: a new one); rerun with the same id to resume")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start an unfinished --run-id over: delete its earlier attempts instead of resuming "
        "(refused for a committed run)",
    )
    p.add_argument(
        "--address",
        help="Ray cluster address, `auto` = the running cluster (default: RAY_ADDRESS, else a new local Ray)",
    )
    p.add_argument("--local", action="store_true", help="run in this process without Ray")
    p.add_argument(
        "--update-from",
        metavar="RUN_ID",
        help="refresh: reuse this committed run's per-user results for users whose record is "
        "unchanged (no model call), map changed and new users, drop users no longer in --input; "
        "grouping, reduce and calibration run as usual",
    )
    p.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help=f"data dir of the embedded S3 server (default: {DEFAULT_WORKDIR})",
    )
    add_config_flags(p)
    p.set_defaults(func=cmd_personalize)

    p = sub.add_parser(
        "forget",
        help="forget users: list the runs that hold them, publish a new run without them",
        description="Forget users: find the runs that hold them (every object read), then publish a new run made\n"
        "from a run's own partitions without their rows (re-reduced, re-grouped and, when the edits are\n"
        "calibrated, recalibrated with the run's model in this process). `latest` moves to the new run\n"
        "when the source is the latest run. Remove the users from the input users file as well.",
        epilog=_FORGET_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--user", required=True, nargs="+", action="extend", metavar="ID", help="user ids to forget"
    )
    p.add_argument(
        "--store",
        help="the runs' store: s3://bucket/prefix or a local dir (default: the embedded S3 server under --workdir)",
    )
    p.add_argument(
        "--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL / CHAMELEON_S3_ENDPOINT)"
    )
    p.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help=f"data dir of the embedded S3 server (default: {DEFAULT_WORKDIR})",
    )
    p.add_argument("--run", default="latest", help="the run to copy without the users (default: latest)")
    p.add_argument("--new-run-id", help="id of the new run (default: a new forget-… id)")
    p.add_argument("--list", action="store_true", help="only list the runs that hold the users")
    p.add_argument(
        "--delete-old",
        action="store_true",
        help="after publishing, delete every run that holds the users, runs without a manifest "
        "included (irreversible)",
    )
    p.add_argument(
        "--single-writer",
        action="store_true",
        help="allow a store that does not enforce exclusive create (storage.single_writer): "
        "no other job or forget may write to it meanwhile",
    )
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser(
        "demo",
        help="run the job on example users and show base vs personalized answers",
        epilog="examples:\n  chameleon demo\n  chameleon demo --local --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help=f"where the example users and the embedded store live (default: {DEFAULT_WORKDIR})",
    )
    p.add_argument("--run-id", help="run id (default: a new one)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--local", action="store_true", help="skip Ray (in-process job)")
    p.add_argument("--quick", action="store_true", help="fewer pairs and shorter answers")
    add_config_flags(p)
    p.set_defaults(func=cmd_demo)

    add_serve_parser(sub, embedded_store=demo_store)
    add_eval_parser(sub)
    for command in sub.choices.values():  # `chameleon demo -v` as well as `chameleon -v demo`
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def _loaded(module: str, name: str) -> type[BaseException] | None:
    """An error class of `module` if the command imported it (an exception of a module that was
    never imported cannot have been raised; importing it here would pull torch into every command)."""
    return getattr(sys.modules[module], name) if module in sys.modules else None


_USER_ERRORS = (  # messages written for the user: one line, exit 2
    ("chameleon.data.storage", "StoreError"),
    ("chameleon.data.artifacts", "ArtifactError"),
    ("chameleon.core.model", "ModelNotAvailableError"),
    ("chameleon.dev.s3server", "S3ServerError"),
)


def _is_user_error(exc: BaseException) -> bool:
    builtin = (ValueError, FileNotFoundError, PermissionError, ValidationError)
    return isinstance(exc, builtin) or any(
        (cls := _loaded(module, name)) is not None and isinstance(exc, cls) for module, name in _USER_ERRORS
    )


QUIET_LIBRARY_ENV = {
    # transformers' own warnings and its progress bars ("Loading weights", "Writing model shards"),
    # here and in Ray workers started from this process (they inherit the environment).
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def configure_output(verbose: bool) -> None:
    """The one place that sets up logging and the libraries' console output. Without -v: the
    project's warnings, one progress bar, the results; Ray's, Ray Data's and transformers' own
    lines stay off the terminal (Ray keeps them in its session logs). With -v: everything."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    set_quiet_console(not verbose)
    if not verbose:
        for key, value in QUIET_LIBRARY_ENV.items():
            os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(args.verbose)
    set_local_env_defaults()
    try:
        return args.func(args)
    except Exception as exc:
        if args.verbose:
            log.exception("%s failed", args.command)
        job_failed = _loaded("chameleon.job.publish", "JobFailedError")
        if job_failed is not None and isinstance(exc, job_failed):
            print(f"chameleon: job failed: {exc}", file=sys.stderr)
            return 1
        if _is_user_error(exc):
            print(f"chameleon: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
