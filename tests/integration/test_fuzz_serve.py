"""Bad input never reaches an engine as a crash, on a synthetic backend behind the router.

- Every field of both endpoints, one or two odd values at a time in an otherwise valid request: each
  answer is a 200 or a 400 in OpenAI's shape naming the field, never a 5xx.
- Schemathesis against the router's OpenAPI schema (FastAPI generates it; it names the served models, so
  generated requests reach the request logic instead of a 404): every answer below 500, none hangs.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest

from raystack.config import backend_app_name, deployment_name
from raystack.protocol import REQUEST_MODELS
from tests.integration.conftest import deployed, synthetic
from tests.serve_cluster import engine_stats

MODEL = "fuzz"
EXAMPLES_PER_OPERATION = 45  # the odd-field test above covers every field; this explores shapes
REQUEST_TIMEOUT_S = 20  # a synthetic answer takes milliseconds: past this, the router hung
SEED = 7  # reproducible in CI; change it locally to explore further
VALID = {
    "chat": {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]},
    "completion": {"model": MODEL, "max_tokens": 4, "prompt": "hello"},
}
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
# Odd for almost any field: wrong types, edges of numbers, empty and nested containers.
ODD_VALUES: list[Any] = [0.5, -1, 0, 2**31, 2**63, -(2**63) - 1, 1e308, "", "5", "x" * 300, True, None, [], [1],
                         ["a"], [[0.5]], {}, {"a": 1}, [{"type": 1}], {"type": "text"}]


@pytest.fixture(scope="module")
def base(server):
    # As fast as possible: the longest answer allowed (the context) streams in well under a second.
    with deployed(server, "fuzz", [{"name": MODEL, "backends": [synthetic("synthetic", ttft_ms=0, tokens_per_s=0)]}]) as url:
        yield url.removesuffix("/v1")


def completed(app: str = "fuzz") -> int:
    return engine_stats(backend_app_name(app, MODEL, "synthetic"), deployment_name(MODEL, "synthetic"))["completed"]


def odd_cases() -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    """(kind, body, the fields made odd): each field with each odd value, then pairs of them."""
    singles = [(kind, {**VALID[kind], field: value}, (field,))
               for kind in PATHS for field in REQUEST_MODELS[kind].model_fields for value in ODD_VALUES]
    pairs = []
    rng = random.Random(SEED)
    for kind in PATHS:
        fields = list(REQUEST_MODELS[kind].model_fields)
        for _ in range(300):
            first, second = rng.sample(fields, 2)
            pairs.append((kind, {**VALID[kind], first: rng.choice(ODD_VALUES), second: rng.choice(ODD_VALUES)},
                          (first, second)))
    return singles + pairs


def test_every_field_with_odd_values_is_answered_or_refused_by_name(base):
    cases = odd_cases()
    assert len(cases) >= 1000

    async def send_all() -> list[httpx.Response]:
        limit = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
            async def send(kind: str, body: dict[str, Any]) -> httpx.Response:
                async with limit:
                    return await client.post(PATHS[kind], json=body)
            return await asyncio.gather(*(send(kind, body) for kind, body, _ in cases))

    before = completed()
    responses = asyncio.run(send_all())
    wrong = []
    for (kind, body, fields), response in zip(cases, responses):
        if response.status_code == 200:
            continue
        error = response.json().get("error", {}) if "json" in response.headers.get("content-type", "") else {}
        param = error.get("param") or ""
        refused = {400, 404} if param == "model" else {400}  # a model that does not exist is a 404
        if response.status_code not in refused or not error.get("message") or param.split(".")[0] not in fields:
            wrong.append(f"{PATHS[kind]} {fields} -> {response.status_code} {response.text[:200]}")
    assert not wrong, f"{len(wrong)} of {len(cases)} odd requests were not a 200 or a 400 naming the field:\n" + \
        "\n".join(wrong[:30])
    answered = sum(r.status_code == 200 for r in responses)
    assert completed() - before == answered > 100  # the valid ones did reach the engine, and only they


def test_the_schema_names_the_served_models(base):
    schema = httpx.get(f"{base}/openapi.json").json()
    for path in PATHS.values():
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["model"]["enum"] == [MODEL, f"{MODEL}@synthetic"]


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


def test_fuzzed_requests_get_no_5xx_and_no_hang(base, tmp_path):
    before = completed()
    schemathesis = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(schemathesis), "run", f"{base}/openapi.json", "--url", base,
         "--checks", "not_a_server_error", "--mode", "all", "--phases", "examples,coverage,fuzzing",
         "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED),
         "--request-timeout", str(REQUEST_TIMEOUT_S), "--workers", "2", "--generation-database", "none",
         "--no-color", "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")],
        capture_output=True, text=True, timeout=900,
    )
    answered = completed() - before
    assert (tmp_path / "junit.xml").exists(), f"schemathesis did not run:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    ours, theirs = problems(tmp_path / "junit.xml")
    assert not ours, "server errors or hangs:\n" + "\n\n".join(ours)[:8000]
    if theirs:  # errors inside schemathesis' own case generation: not the API's fault, but say so
        warnings.warn("schemathesis reported errors of its own:\n" + "\n\n".join(theirs)[:4000])
    # It did test: generated requests got past the router's checks and were answered by the engine.
    assert answered >= 200, f"only {answered} fuzzed requests reached the engine:\n{run.stdout[-4000:]}"
