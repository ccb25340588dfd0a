"""Shared output convention of the benchmarks: `name=value` lines, headline last, `--out FILE` JSON."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

# Benchmarks run as scripts (`python jobs/bench/X.py`): make the project importable from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", help="also write the figures as JSON to this file")
    return p


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
    """A valid manifest for a run that holds files only (no edits): e.g. a previous `latest`."""
    from chameleon.config import EditConfig
    from chameleon.data.manifest import Counts, ModelInfo, RunManifest

    none = dict(accepted=0, partitions=0, users_mapped=0, users_failed=0, users_with_edit=0, groups=0)
    return RunManifest(
        model=ModelInfo(id="stub", fingerprint={}),
        hidden_size=1,
        captured_layers=[0],
        site="residual",
        max_rank=1,
        edit=EditConfig(),
        prompt_version="stub",
        groups=[],
        user_shards=[],
        counts=Counts(**none, pairs=0, pairs_kept=0),
        timings_s={},
        config={},
    )
