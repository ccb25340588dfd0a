"""The serving and model benchmarks of jobs/bench/ at their smoke size (`tests/bench_smoke.py`)."""

from __future__ import annotations

import pytest
from bench_smoke import run_smoke

pytestmark = pytest.mark.e2e

SERVING_BENCHES = (
    "demo_capacity.py",
    "edit_overhead.py",
    "serve_faults.py",
    "serve_latency.py",
    "serve_load.py",
    "serve_mixed.py",
    "style_capacity.py",
)


@pytest.mark.parametrize("script", SERVING_BENCHES)
def test_serving_benchmark_runs_at_smoke_size(script, tmp_path, ray_session):
    run_smoke(script, tmp_path, ray_session.get_runtime_context().gcs_address)
