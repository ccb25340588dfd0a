"""The README's first steps, run as a newcomer runs them, so the README cannot rot.

The blocks marked `<!-- readme-test: NAME -->` in README.md run as written: `make demo` and
`make serve-demo` as their Makefile recipes (`make test` is this test run itself), the client
snippet as a Python file, in a fresh working directory (where `demo-out/` lands), against real Ray
Serve on loopback and with the official `openai` client. The only substitutions: the tiny random
model instead of the embedded one (`--model DIR` and `--quick` through the targets' `ARGS`), a free
port instead of 8000, and a bearer key in both environments (the snippet reads
`$CHAMELEON_API_KEY`).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chameleon.dev.demo import EXAMPLE_STYLES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"
VENV = Path(sys.executable).parent.parent
BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)
EXAMPLE_USERS = [f"{style}-1" for style in EXAMPLE_STYLES]


def readme_blocks() -> dict[str, tuple[str, str]]:
    """{name: (language, code)} of the marked blocks."""
    return {name: (lang, code) for name, lang, code in BLOCK.findall(README.read_text())}


def commands(code: str) -> list[str]:
    """The command lines of a shell block, comments dropped."""
    lines = (line.split("#", 1)[0].strip() for line in code.splitlines())
    return [line for line in lines if line]


def make_recipe(target: str, args: str) -> list[str]:
    """The commands `make TARGET ARGS=...` runs (its own lines; `install` is done: we run in .venv)."""
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        if not line.strip().startswith("#"):
            recipe.append(line.strip().replace("$(VENV)", str(VENV)).replace("$(ARGS)", args))
    assert recipe, f"make {target} runs nothing"
    return recipe


def make_env(**extra: str) -> dict[str, str]:
    """This environment plus the Makefile's exports, without a Ray cluster or a key to inherit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CHAMELEON_API_KEY")}
    for name, value in re.findall(r"^export (\w+) :?= ?(.*)$", MAKEFILE.read_text(), re.M):
        env[name] = value.strip()
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_make(line: str, args: str, cwd: Path, env: dict[str, str], timeout: float) -> list[tuple[str, str]]:
    """Run the recipe of `make TARGET` (the README line) with ARGS; (stdout, stderr) per command."""
    target = shlex.split(line)[1]
    out = []
    for command in make_recipe(target, args):
        done = subprocess.run(
            shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        out.append((done.stdout, done.stderr))
    return out


def check_quiet(stdout: str, stderr: str) -> None:
    """The demo's console: its own lines, no Ray/Ray Data/transformers chatter."""
    noisy = [
        line
        for line in (stdout + stderr).splitlines()
        if re.search(r"\b(INFO|WARNING|DEBUG)\b|Loading weights|streaming_executor|Traceback", line)
    ]
    assert not noisy, "library output on the console:\n" + "\n".join(noisy[:20])
    # At most Ray's one-line note that it read the log level it was given, besides the job's own
    # progress line (a log line per interval when stderr is not a terminal).
    other = [line for line in stderr.splitlines() if line.strip() and not line.startswith("map: users ")]
    assert len(other) <= 1, stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_quick_start_demo_serve_and_client(tiny_model_dir, tmp_path):
    blocks = readme_blocks()
    assert set(blocks) == {"quickstart", "serve", "client"}, sorted(blocks)
    assert [lang for lang, _ in blocks.values()] == ["bash", "bash", "python"]

    # 1-2. `make demo`, `make test`: the demo runs here; `make test` is what runs this test.
    quickstart = commands(blocks["quickstart"][1])
    assert quickstart == ["make demo", "make test"]
    assert "pytest" in " ".join(make_recipe("test", ""))
    model = shlex.quote(str(tiny_model_dir))
    ((stdout, stderr),) = run_make(quickstart[0], f"--model {model} --quick", tmp_path, make_env(), 420)
    check_quiet(stdout, stderr)
    # The answers the newcomer came for, then where everything is.
    cores = len(os.sched_getaffinity(0))
    assert f"on {max(1, min(cores, 3))} model replica(s) (local Ray), {cores} core(s)" in stdout
    run_id = re.search(r"^run (\S+): 12 users accepted", stdout, re.M).group(1)
    positions = []
    for user in EXAMPLE_USERS:
        match = re.search(
            rf"^== {re.escape(user)} \(group \S+, marker part: (\S+)\) — .+\n   base: .*\n   personalized: .*$",
            stdout,
            re.M,
        )
        assert match, f"no answers for {user}:\n{stdout}"
        # Marker parts are off by default (the embedded model writes no marker readably).
        assert match.group(1) == "none", match.group(0)
        positions.append(match.start())
    assert positions == sorted(positions)
    tail = stdout[positions[-1] :]
    assert f"runs/{run_id}/ on the embedded S3 server" in tail and "make serve-demo" in tail
    assert (tmp_path / "demo-out" / "example_users.jsonl").is_file()
    assert (tmp_path / "demo-out" / "s3").is_dir(), "the embedded store stays for the next commands"

    # 3. `make serve-demo` in the background, on the store the demo left.
    serve_lines = commands(blocks["serve"][1])
    assert serve_lines == ["make serve-demo"]
    port = free_port()
    key = "sk-readme-" + secrets.token_hex(8)
    env = make_env(CHAMELEON_API_KEY=key)
    (command,) = make_recipe("serve-demo", f"--model {model} --port {port}")
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            shlex.split(command),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while "ready in" not in log_path.read_text():
            assert server.poll() is None, f"the server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the server was not ready in time:\n{log_path.read_text()}"
            time.sleep(0.25)
        lines = log_path.read_text().splitlines()
        ready = next(line for line in lines if "ready in" in line)
        noisy = [line for line in lines if re.search(r"\b(INFO|WARNING)\b|Loading weights", line)]
        assert not noisy, "library output on the server's console:\n" + "\n".join(noisy[:20])
        assert f"run {run_id} of s3://chameleon/demo (12 users" in ready, ready
        assert "bearer token from $CHAMELEON_API_KEY" in ready, ready

        # The client snippet, as written but for the port.
        lang, code = blocks["client"]
        assert "127.0.0.1:8000" in code
        client = tmp_path / "client.py"
        client.write_text(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
        done = subprocess.run(
            [sys.executable, str(client)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for user in ("shouty_fan-1", "lowercase_texter-1"):
            match = re.search(rf"^{user}: .*\n  (\{{.*\}})$", done.stdout, re.M)
            assert match, done.stdout
            assert f"'run_id': '{run_id}'" in match.group(1) and "'source': 'user'" in match.group(1)
        assert re.search(r"^base: ", done.stdout, re.M), done.stdout
    finally:
        server.send_signal(signal.SIGTERM)  # stops like Ctrl-C: Ray and the embedded store with it
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.parametrize(
    "cores, actors, threads",
    [(1, 1, 1), (2, 2, 1), (3, 3, 1), (4, 3, 1), (8, 3, 2), (64, 3, 21)],
)
def test_the_demo_uses_every_core_it_is_given(cores, actors, threads):
    """The README's "a local Ray using every core": replicas of at least 4 users, threads for the rest."""
    from chameleon.config import ChameleonConfig
    from chameleon.dev.demo import fit_to_cores

    job = fit_to_cores(ChameleonConfig(), 12, cores, local=False).job
    assert (job.num_actors, job.torch_threads) == (actors, threads)
    assert job.users_per_partition * actors >= 12 and job.num_cpus_per_actor <= threads
    assert fit_to_cores(ChameleonConfig(), 12, cores, local=True).job.torch_threads == cores
    # A job section the user set (--config, --num-actors, ...) is theirs.
    mine = ChameleonConfig().with_overrides({"job.num_actors": 2, "job.users_per_partition": 5})
    assert fit_to_cores(mine, 12, cores, local=False).job == mine.job
