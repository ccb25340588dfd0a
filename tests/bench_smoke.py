"""Running a benchmark of jobs/bench/ at its smoke size (`--smoke`), so none can break unseen.

`tests/test_bench_job.py` runs the scripts of `JOB_BENCHES` through `run_smoke` and
`tests/test_bench_serving.py` those of `SERVING_BENCHES`, a file each so that `make test`'s workers
can take them side by side; every script is in exactly one list (`tests/test_bench_job.py`
checks). Each runs as `make bench` runs it, a script in a fresh interpreter (a tiny random model
instead of a real one), and must end with `name=value` lines, headline last, and write its
`--out` JSON. The speed figures of a smoke run
mean nothing; the integrity benchmarks' goals hold at any size, so their smoke runs are tests of
them (`SMOKE_GOALS`; map actors killed mid-run and store outages mid-job are tested there only).
The benchmarks that use Ray join the pytest session's Ray through RAY_ADDRESS
(`jobs/bench/common.start_local_ray`) instead of starting their own: a Ray start costs 10 to 30 s
on 2 loaded cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")

JOB_BENCHES = (
    "calibration_speed.py",
    "integrity_store_checks.py",
    "job_integrity.py",
    "job_scale.py",
    "pipeline_scaling.py",
    "reduce_speed.py",
)
"""Run by tests/test_bench_job.py."""

SERVING_BENCHES = (
    "demo_capacity.py",
    "edit_overhead.py",
    "serve_faults.py",
    "serve_latency.py",
    "serve_load.py",
    "serve_mixed.py",
    "style_capacity.py",
)
"""Run by tests/test_bench_serving.py."""

SMOKE_GOALS = {
    "job_integrity.py": {"integrity_violations": 0, "killed_actors": 1},
    "integrity_store_checks.py": {"store_integrity_violations": 0},
}
"""Figures a smoke run must reach: 0 = exactly 0 (a goal-0 count), 1 = at least 1 (the chaos
check really killed an actor, so its artifact comparison tested something)."""


def run_smoke(script: str, workdir: Path, ray_address: str) -> dict:
    """Run `script --smoke` in `workdir`, joined to the Ray at `ray_address`; check its output
    convention and `SMOKE_GOALS`; return its figures."""
    out = workdir / "figures.json"
    env = {k: v for k, v in os.environ.items() if k != "CHAMELEON_API_KEY"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS=ray_address)
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out", str(out)],
        cwd=workdir,
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
    figures = payload.get("figures", payload)
    assert headline in figures, sorted(payload)
    for name, goal in SMOKE_GOALS.get(script, {}).items():
        value = figures[name]
        assert (value == 0) if goal == 0 else (value >= goal), (
            f"{script}: {name}={value}\n{done.stdout[-3000:]}"
        )
    return figures
