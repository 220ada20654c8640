# The two commands: `make run` sets up and serves the embedded default; `make test` sets up and tests.
VENV ?= .venv
PYTHON ?= python3
# No usage reports or telemetry from the libraries underneath (air-gapped clusters; CI).
export HF_HUB_DISABLE_TELEMETRY = 1
export VLLM_NO_USAGE_STATS = 1
export DO_NOT_TRACK = 1
export RAY_USAGE_STATS_ENABLED = 0
# The Ray that `serve run` starts gets what `raystack start` exports (raystack/process.py, RAY_START_ENV, says
# why): its workers at normal priority, Serve's controller pass every 0.5 s, Serve's throughput preset
# without direct ingress. The preset is not for the tests' own process: there it would make synchronous
# handle calls from test code fail (no event loop); tests/conftest.py sets the rest.
RAY_START = $(VENV)/bin/python -c 'from raystack.process import RAY_START_ENV as env; \
	print(" ".join(f"{k}={v}" for k, v in env.items()))'
CONFIG ?= deploy_configs/local.yaml

.PHONY: setup setup-test run test test-unit check-configs check-ascend clean

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

run: setup
	env $$($(RAY_START)) $(VENV)/bin/serve run $(CONFIG)

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
