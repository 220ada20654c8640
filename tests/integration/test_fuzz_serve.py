"""Schemathesis against the router's OpenAPI schema (FastAPI generates it), on a synthetic backend:
a bounded number of generated requests, valid and invalid, per operation. Every answer must be below
500 and come within the request timeout: no server error, no hang."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

from ray import serve

from raystack.config import deployment_name
from tests.integration.conftest import deployed, synthetic
from tests.integration.fuzz_hooks import FUZZED_MODEL

EXAMPLES_PER_OPERATION = 150
REQUEST_TIMEOUT_S = 20  # a synthetic answer takes milliseconds: past this, the router hung
SEED = 7  # reproducible in CI; change it locally to explore further


def problems(junit: Path) -> tuple[list[str], list[str]]:
    """(what the API did wrong, what went wrong inside schemathesis) from its JUnit report. A check that
    failed (a 5xx) and a network error (a timeout: a hang; a reset connection) are the API's."""
    ours, theirs = [], []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for failure in case.findall("failure"):
            ours.append(f"{case.get('name')}: {failure.text}")
        for error in case.findall("error"):
            (ours if (error.text or "").startswith("Network Error") else theirs).append(
                f"{case.get('name')}: {error.text}")
    return ours, theirs


def test_fuzzed_requests_get_no_5xx_and_no_hang(server, tmp_path):
    # As fast as possible: the longest answer allowed (the context) streams in well under a second.
    backend = synthetic("synthetic", ttft_ms=0, tokens_per_s=0)
    with deployed(server, "fuzz", [{"name": FUZZED_MODEL, "backends": [backend]}]) as url:
        base = url.removesuffix("/v1")
        schemathesis = Path(sys.executable).with_name("schemathesis")
        run = subprocess.run(
            [str(schemathesis), "run", f"{base}/openapi.json", "--url", base,
             "--checks", "not_a_server_error", "--mode", "all", "--phases", "examples,coverage,fuzzing",
             "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED),
             "--request-timeout", str(REQUEST_TIMEOUT_S), "--workers", "2", "--generation-database", "none",
             "--no-color", "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")],
            env=os.environ | {"SCHEMATHESIS_HOOKS": "tests.integration.fuzz_hooks"},
            capture_output=True, text=True, timeout=900,
        )
        engine = serve.get_deployment_handle(deployment_name(FUZZED_MODEL, "synthetic"), app_name="fuzz")
        answered = engine.stats.remote().result(timeout_s=30)["completed"]
    assert (tmp_path / "junit.xml").exists(), f"schemathesis did not run:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    ours, theirs = problems(tmp_path / "junit.xml")
    assert not ours, "server errors or hangs:\n" + "\n\n".join(ours)[:8000]
    if theirs:  # errors inside schemathesis' own case generation: not the API's fault, but say so
        warnings.warn("schemathesis reported errors of its own:\n" + "\n\n".join(theirs)[:4000])
    # It did test: many generated requests got past the router's checks and were answered by the engine.
    assert answered >= 50, f"only {answered} fuzzed requests reached the engine:\n{run.stdout[-4000:]}"
