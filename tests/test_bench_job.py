"""The batch-job benchmarks of jobs/bench/ at their smoke size (`tests/bench_smoke.py`), and the
check that every benchmark has a smoke test here or in `tests/test_bench_serving.py`."""

from __future__ import annotations

import pytest
from bench_smoke import JOB_BENCHES, SCRIPTS, SERVING_BENCHES, run_smoke

pytestmark = pytest.mark.e2e


def test_every_benchmark_has_one_smoke_test():
    assert {"reduce_speed.py", "serve_latency.py", "edit_overhead.py"} <= set(SCRIPTS)
    assert sorted(JOB_BENCHES + SERVING_BENCHES) == SCRIPTS, (
        "a benchmark without a smoke test, or in both files"
    )


@pytest.mark.parametrize("script", JOB_BENCHES)
def test_job_benchmark_runs_at_smoke_size(script, tmp_path, ray_session):
    run_smoke(script, tmp_path, ray_session.get_runtime_context().gcs_address)
