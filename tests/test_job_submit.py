"""`ray job submit ... -- python jobs/personalize.py` against `ray start --head` on loopback (slow)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from chameleon.data.artifacts import RunReader
from chameleon.dev.demo import write_example_users

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(s3_server, tmp_path):
    """A real `ray start --head --block` on loopback whose environment carries the S3 keys."""
    gcs, dash = free_port(), free_port()
    # Ray's Unix socket paths live under the temp dir and must stay short (107 bytes).
    short_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        **s3_server.env(),
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={short_tmp}",
        "--object-store-memory=300000000",
        # Another Ray on this machine (a test's in-process one) holds the default agent ports.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", dash)) == 0:
                break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray start --head did not open its dashboard in time")
    time.sleep(2)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # `ray start --block` often outlives SIGTERM: 30 s here cost 30 s of every run
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(short_tmp, ignore_errors=True)


def test_ray_job_submit_runs_the_job(ray_head, s3_server, tiny_model_dir, tmp_path):
    address, env = ray_head
    users = write_example_users(tmp_path / "users.jsonl")
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model_dir)},
                "synth": {"pairs_per_user": 2, "insight_max_new_tokens": 8, "answer_max_new_tokens": 8},
                "subspace": {"ccs_steps": 50, "ccs_restarts": 2},
                "groups": {"n_groups": 2, "min_group_size": 2},
                "job": {"num_actors": 1, "num_cpus_per_actor": 1, "users_per_partition": 6},
            }
        )
    )
    s3_server.store("submitted").exists("probe")  # creates the bucket (lazily, on first use)
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "jobs/personalize.py",
        "--config",
        str(config),
        "--input",
        str(users),
        "--store",
        "s3://submitted/out",
        "--s3-endpoint",
        s3_server.endpoint_url,
        "--run-id",
        "submitted-1",
    ]
    # `ray start` enables token auth (token in ~/.ray/auth_token); the job CLI must opt in to send it.
    env = {**env, "RAY_AUTH_MODE": "token"}
    for _ in range(10):  # the job agent comes up a few seconds after the dashboard
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run submitted-1: 12 users accepted" in result.stdout
    reader = RunReader(s3_server.store("submitted", "out"), "latest")
    assert reader.manifest.run_id == "submitted-1" and reader.manifest.counts.accepted == 12
