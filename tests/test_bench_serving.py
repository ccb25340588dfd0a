"""The serving and model benchmarks of jobs/bench/ at their smoke size (`tests/bench_smoke.py`)."""

from __future__ import annotations

import pytest
from bench_smoke import SERVING_BENCHES, run_smoke

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("script", SERVING_BENCHES)
def test_serving_benchmark_runs_at_smoke_size(script, tmp_path, ray_session):
    run_smoke(script, tmp_path, ray_session.get_runtime_context().gcs_address)
