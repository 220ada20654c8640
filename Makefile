# The two commands: `make run` sets up and serves the embedded default; `make test` sets up and tests.
VENV ?= .venv
PYTHON ?= python3
# No usage reports or telemetry from the libraries underneath (air-gapped clusters; CI).
export HF_HUB_DISABLE_TELEMETRY = 1
export VLLM_NO_USAGE_STATS = 1
export DO_NOT_TRACK = 1
export RAY_USAGE_STATS_ENABLED = 0
# Ray runs workers at nice 15; serving replicas (and Serve's proxy) are the workload, not background jobs.
export RAY_worker_niceness = 0
# Serve's throughput preset without direct ingress (raystack/process.py says why, and holds the
# settings), for the Ray that `serve run` starts (its proxy). Not for the tests' own process: there it
# would make synchronous handle calls from test code fail (no event loop); their replicas get it from
# build_router and build_backend.
SERVE_FAST_PATH = $(VENV)/bin/python -c 'from raystack.process import SERVE_FAST_PATH_ENV as env; \
	print(" ".join(f"{k}={v}" for k, v in env.items()))'
CONFIG ?= deploy_configs/local.yaml

.PHONY: setup setup-test run test test-unit check-configs check-ascend clean

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

run: setup
	env $$($(SERVE_FAST_PATH)) $(VENV)/bin/serve run $(CONFIG)

test: setup-test
	$(VENV)/bin/python -m pytest -v tests

test-unit: setup-test
	$(VENV)/bin/python -m pytest -v tests/unit

# What each Ascend node kind installs (install/) resolves for linux x86_64 and aarch64: pip's resolver, dry run.
check-ascend:
	$(PYTHON) scripts/check_ascend_install.py

check-configs:
	@for f in deploy_configs/*.yaml; do $(VENV)/bin/raystack config check $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
