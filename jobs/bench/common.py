"""Shared output convention of the benchmarks: `name=value` lines, headline last, `--out FILE` JSON."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

# Benchmarks run as scripts (`python jobs/bench/X.py`): make the project importable from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the figures as JSON to this file")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny size that runs in seconds (tests/test_bench_*.py): checks that the script works; "
        "its figures mean nothing",
    )
    return p


def parse(p: argparse.ArgumentParser, smoke: dict, argv=None) -> argparse.Namespace:
    """Parse the flags; with `--smoke`, `smoke` replaces the defaults (flags given still win)."""
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**smoke)
        args = p.parse_args(argv)
    return args


TINY_MODEL = "tiny"
"""`--model tiny` (the smoke default): the tests' tiny random Llama (hidden 64, 4 layers, the
embedded model's real tokenizer), saved to a temporary directory for this process."""


def tiny_model_dir(workdir: Path) -> Path:
    """The tiny random Llama saved under `workdir` (reused when it is there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_models import save_tiny_model

    path = Path(workdir) / "tiny-model"
    return path if (path / "config.json").exists() else save_tiny_model(path)


def model_path(name: str) -> str:
    """A `--model` value as `load_model` takes it (`tiny`: a fresh tiny model, removed at exit)."""
    if name != TINY_MODEL:
        return name
    workdir = tempfile.mkdtemp(prefix="chameleon-bench-model-")
    atexit.register(shutil.rmtree, workdir, True)
    return str(tiny_model_dir(Path(workdir)))


SYNTHETIC_STYLES = (
    "OMG so hyped!!!",
    "i guess it was fine.",
    "Indeed, most agreeable.",
    "lol ok 😂",
    "deploy done.",
)
"""Five writing styles the synthetic users cycle through (so groups have something to find)."""


def synthetic_user(i: int, items: int = 6, changed: bool = False) -> dict:
    """User `i` of the job benchmarks: `items` short texts in one of SYNTHETIC_STYLES; `changed`
    adds a new item (the user's history grew since the last run)."""
    style = SYNTHETIC_STYLES[i % len(SYNTHETIC_STYLES)]
    history = [{"text": f"{style} item {j} of user {i}"} for j in range(items)]
    if changed:
        history.append({"text": f"{style} a new item of user {i}"})
    return {"user_id": f"user-{i:06d}", "history": history}


def start_local_ray(num_cpus: int, tries: int = 6, log_to_driver: bool = True) -> None:
    """A local Ray for a benchmark's driver. Ray gives its raylet 30 s to start, too short on a
    loaded machine: a failed start is retried (`tries` in all). With RAY_ADDRESS set, the driver
    joins that cluster instead (tests/test_bench_*.py: the pytest session's Ray)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
        return
    for attempt in range(tries):
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                object_store_memory=512 * 2**20,
                log_to_driver=log_to_driver,
            )
            return
        except Exception:
            ray.shutdown()
            if attempt == tries - 1:
                raise


def report(figures: dict, headline: str, out: str | None, extra: dict | None = None) -> None:
    """Print each figure as `name=value` with the headline figure last; optionally write JSON."""
    for name, value in figures.items():
        if name != headline:
            print(f"{name}={_fmt(value)}")
    print(f"{headline}={_fmt(figures[headline])}")
    if out:
        payload = {"figures": figures, "headline": headline, "machine": platform.platform(), **(extra or {})}
        Path(out).write_text(json.dumps(payload, indent=2) + "\n")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stub_manifest():
    """A valid manifest for a run that holds files only (no edits): the tests' own stub."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from stub_runs import stub_manifest as stub

    return stub()
