"""Every benchmark in jobs/bench/ runs at its smoke size (`--smoke`), so none can break unseen.

Each runs as `make bench` runs it, a script in a fresh interpreter (a tiny random model instead of
a real one), and must end with `name=value` lines, headline last, and write its `--out` JSON. The
figures of a smoke run mean nothing. The benchmarks that use Ray join the pytest session's Ray
through RAY_ADDRESS (`jobs/bench/common.start_local_ray`) instead of starting their own: a Ray start
costs 10 to 30 s on 2 loaded cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


def test_every_benchmark_is_found():
    assert {"reduce_speed.py", "serve_latency.py", "edit_overhead.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_at_smoke_size(script, tmp_path, ray_session):
    out = tmp_path / "figures.json"
    env = {k: v for k, v in os.environ.items() if k != "CHAMELEON_API_KEY"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
    )
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    lines = [line for line in done.stdout.splitlines() if re.fullmatch(r"[a-z][a-z0-9_]*=\S.*", line)]
    assert lines, done.stdout[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last == lines[-1], f"the headline `name=value` line must come last, got {last!r}"
    headline = last.split("=", 1)[0]
    payload = json.loads(out.read_text())
    assert headline in payload or headline in payload.get("figures", {}), sorted(payload)
