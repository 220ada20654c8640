"""The playground (raystack/router/playground.py) in a real browser: headless Chromium driven by Playwright,
against a router with API keys on and under the route prefix /play (the page's root_path), serving `chat`,
a model of two synthetic backends of known pace (`fast`: the first token after 200 ms, `slow`: after 600 ms;
then 50 tokens/s), and `secret-model`, which the testers' keys may not use; and a router without keys behind
Serve's proxy, with two models of one backend each. Not 100 and 300 ms: on 2 cores the router's path to a
backend and back adds 10-27 ms to what the browser measures, at the edge of 20 % of 100 ms.

What a person sees: a key asked for, a wrong one refused with the router's own 401 message, only the key's
models, both backends streaming side by side with each panel's TTFT within 20 % of its backend's, one
panel's parameters applied to all, "show code" giving curl and Python that answer what the panel showed, a
key limit's 429 with its Retry-After, and no error in the page's console beyond the browser's own note of
each refusal the test asked for.

Needs Chromium at /usr/bin/chromium (Debian's `chromium`) and the playwright package (the test extra):
without them the module skips with one line, unless RAYSTACK_REQUIRE_BROWSER=1 (.ci/run sets it), where its
tests fail. RAYSTACK_PLAYGROUND_SCREENSHOT=docs/playground.png makes the streaming test save the README's
screenshot there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from raystack.router.playground import CONTENT_SECURITY_POLICY
from tests.integration.conftest import deployed, synthetic

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("RAYSTACK_REQUIRE_BROWSER") == "1"
GET_A_BROWSER = ("apt-get install chromium (as root), and the playwright package (make setup-test installs "
                 "it); RAYSTACK_REQUIRE_BROWSER=1 makes this a failure")


def _missing_browser() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM}"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed"
    return None


MISSING = _missing_browser()
if MISSING and not REQUIRED:
    pytest.skip(f"playground browser tests: {MISSING}; to run them: {GET_A_BROWSER}", allow_module_level=True)

TTFT_MS = {"fast": 200, "slow": 600}
TOKENS_PER_S = 50
MODELS = [{"name": "chat", "backends": [synthetic(name, ttft_ms=ttft, tokens_per_s=TOKENS_PER_S)
                                        for name, ttft in TTFT_MS.items()]},
          {"name": "secret-model", "backends": [synthetic("s")]}]
KEYS = """\
keys:
  - name: tester
    key: sk-play
    models: [chat]
  - name: limited
    key: sk-limited
    models: [chat]
    requests_per_minute: 1
"""
PROMPT = "Which backend answers first?"


@pytest.fixture(scope="module", autouse=True)
def browser_required():
    if MISSING:  # only reached with RAYSTACK_REQUIRE_BROWSER=1: CI must run these tests, not skip them
        pytest.fail(f"RAYSTACK_REQUIRE_BROWSER=1 but {MISSING}: {GET_A_BROWSER}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Debian's Chromium: Playwright cannot download its own builds here. It adds --headless and,
        # as root, --no-sandbox itself.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def api(server, tmp_path_factory):
    """The router's OpenAI base URL, http://127.0.0.1:PORT/play/v1, once each backend has answered once:
    a router's first request to a backend opens its handle, which is not what a panel measures."""
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(KEYS)
    with deployed(server, "play", MODELS, router={"api_keys": {"file": str(keys)}}) as url:
        for backend in TTFT_MS:
            warm = httpx.post(f"{url}/chat/completions", headers={"Authorization": "Bearer sk-play"}, timeout=30,
                              json={"model": f"chat@{backend}", "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 1})
            assert warm.status_code == 200, warm.text
        yield url


@pytest.fixture(scope="module")
def page_url(api):
    return api.removesuffix("/v1") + "/playground"


@dataclass
class Tab:
    """A fresh browser tab (its own session storage) on the playground, and what its console said."""

    page: object  # playwright's Page
    console_errors: list[tuple[str, str]] = field(default_factory=list)  # (text, url of its source)

    def unexpected_errors(self, *refusals: tuple[int, str]) -> list[tuple[str, str]]:
        """The console's errors, less the browser's own "Failed to load resource" note for each refusal
        (status, path ending) the test provoked on purpose: the page itself must log none."""
        return [(text, url) for text, url in self.console_errors
                if not any(f"status of {status} " in text and url.endswith(path) for status, path in refusals)]


@contextlib.contextmanager
def open_tab(browser, url: str) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    page = context.new_page()
    opened = Tab(page)
    page.on("console", lambda m: m.type == "error" and opened.console_errors.append((m.text, m.location["url"])))
    page.on("pageerror", lambda err: opened.console_errors.append((f"uncaught: {err}", "")))
    page.goto(url)
    try:
        yield opened
    finally:
        context.close()


@pytest.fixture
def tab(browser, page_url):
    with open_tab(browser, page_url) as opened:
        yield opened


# Without a key, the page's look at /v1/models is refused: the browser notes that 401 in the console.
KEYLESS_LOOK = (401, "/play/v1/models")


def use_key(tab: Tab, key: str) -> None:
    from playwright.sync_api import expect

    page = tab.page
    expect(page.locator("#key-message")).to_contain_text("This router needs an API key")
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")


def send_and_wait(page, timeout_ms: float = 15000) -> None:
    page.fill("#prompt", PROMPT)
    page.click("#send")
    page.wait_for_function("() => [...document.querySelectorAll('.panel')].every(p => "
                           "p.classList.contains('done') || p.classList.contains('failed'))", timeout=timeout_ms)


def stat(panel, name: str) -> float:
    return float(panel.locator(f"[data-stat={name}]").get_attribute("data-value"))


def test_the_page_needs_no_key_names_no_model_and_allows_only_its_own_origin(page_url):
    page = httpx.get(page_url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "connect-src 'self';" in CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    # No inline script or style, no other host, and references relative to the router's root_path.
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=|https?://|\b(src|href)=\"/", page.text)
    for asset in ("playground.js", "playground.css"):
        answer = httpx.get(f"{page_url}/{asset}")
        assert answer.status_code == 200 and not re.search(r"https?://", answer.text), asset
    for answer in (page, httpx.get(f"{page_url}/playground.js")):
        assert "secret-model" not in answer.text and "chat@" not in answer.text
    assert httpx.get(f"{page_url}/index.html").status_code == 404  # its files, each by name, nothing else
    slash = httpx.get(f"{page_url}/")
    assert slash.status_code == 307 and slash.headers["location"] == "../playground"


def test_a_key_is_asked_for_and_a_wrong_one_shows_the_routers_401(tab):
    from playwright.sync_api import expect

    page = tab.page
    use_key(tab, "sk-wrong")
    expect(page.locator("#key-message")).to_have_text(
        "401 Unauthorized: Incorrect API key provided. Ask the operator of this endpoint for a valid key.")
    expect(page.locator("#choose")).to_be_hidden()
    expect(page.locator(".panel")).to_have_count(0)
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept
    assert tab.unexpected_errors(KEYLESS_LOOK) == []


def test_both_backends_stream_side_by_side_each_timed_as_its_backend_paces(tab, api):
    from playwright.sync_api import expect

    page = tab.page
    use_key(tab, "sk-play")
    expect(page.locator("#choose")).to_be_visible()
    # Only what the key may use: the model, then one panel per backend, pinned.
    assert page.locator("#model option").all_inner_texts() == ["chat"]
    panels = page.locator(".panel")
    assert panels.locator(".target").evaluate_all("els => els.map(e => e.value)") == ["chat@fast", "chat@slow"]
    assert "secret-model" not in page.content()
    # The key is in this tab's session storage and nowhere else.
    assert page.evaluate("[sessionStorage.getItem('raystack.playground.key'), localStorage.length, document.cookie]"
                         ) == ["sk-play", 0, ""]
    fast, slow = panels.nth(0), panels.nth(1)
    fast.locator(".max_tokens").fill("16")
    fast.locator(".apply-all").click()
    expect(slow.locator(".max_tokens")).to_have_value("16")

    page.fill("#prompt", PROMPT)
    page.click("#send")
    # Side by side as they stream: the fast panel shows words while the slow one still waits for its first.
    page.wait_for_function("() => { const [fast, slow] = document.querySelectorAll('.panel .content');"
                           " return fast.textContent.length > 0 && slow.textContent.length === 0; }", timeout=5000)
    page.wait_for_function("() => [...document.querySelectorAll('.panel')].every(p => p.classList.contains('done'))",
                           timeout=15000)
    measured = {}
    for panel, backend in ((fast, "fast"), (slow, "slow")):
        measured[backend] = {name: stat(panel, name) for name in ("ttft", "tpot", "rate", "tokens")}
        expect(panel.locator(".served")).to_contain_text(f"served by {backend}")
        expect(panel.locator(".error")).to_be_empty()
    print(f"\nTTFT and TPOT the browser measured: {json.dumps(measured)}")
    for backend, figures in measured.items():
        assert figures["tokens"] == 16
        assert abs(figures["ttft"] - TTFT_MS[backend]) <= 0.2 * TTFT_MS[backend], (backend, figures)
        # A token every 20 ms as they came, not all at once at the end.
        assert abs(figures["tpot"] - 1000 / TOKENS_PER_S) <= 0.2 * 1000 / TOKENS_PER_S, (backend, figures)
        assert 0 < figures["rate"] < TOKENS_PER_S
    answer = fast.locator(".content").inner_text()
    assert len(answer.split()) == 16 and slow.locator(".content").inner_text() == answer  # same prompt, same words
    assert tab.unexpected_errors(KEYLESS_LOOK) == []

    if shot := os.environ.get("RAYSTACK_PLAYGROUND_SCREENSHOT"):  # relative to the repository
        page.screenshot(path=ROOT / shot, full_page=True)

    # "Show code": curl and Python that send what the panel sent, and answer what it showed.
    page.click("#show-code")
    figure = page.locator("#code-blocks figure").nth(0)
    expect(figure.locator("figcaption")).to_have_text("chat@fast")
    curl = figure.locator("code.language-shell").inner_text()
    python = figure.locator("code.language-python").inner_text()
    assert curl.startswith(f"curl -N {api}/chat/completions") and '"max_tokens": 16' in curl
    assert f'base_url="{api}"' in python and 'model="chat@fast"' in python and "max_tokens=16" in python
    assert "sk-play" not in curl + python  # the key is read from the environment, never shown
    env = {**os.environ, "RAYSTACK_API_KEY": "sk-play"}
    printed = subprocess.run([sys.executable, "-c", python], env=env, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and printed.stdout == answer, printed.stderr
    streamed = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True, timeout=60).stdout
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == answer
    assert chunks[-1]["usage"]["completion_tokens"] == 16
    assert tab.unexpected_errors(KEYLESS_LOOK) == []


def test_a_key_over_its_limit_shows_the_429_and_when_to_retry(tab):
    from playwright.sync_api import expect

    page = tab.page
    use_key(tab, "sk-limited")  # one request a minute: of the two panels' requests, one is refused
    expect(page.locator(".panel")).to_have_count(2)
    page.locator(".panel .max_tokens").first.fill("4")
    page.locator(".panel .apply-all").first.click()
    send_and_wait(page)
    errors = [text for text in page.locator(".panel .error").all_inner_texts() if text]
    assert len(errors) == 1, errors
    assert re.fullmatch(r"429 Too Many Requests: .*requests_per_minute 1.* Retry after \d+ s\.", errors[0]), errors
    assert stat(page.locator(".panel:not(.failed)"), "tokens") > 0  # the other was answered
    assert tab.unexpected_errors(KEYLESS_LOOK, (429, "/play/v1/chat/completions")) == []


def test_without_keys_and_through_serves_proxy_two_models_side_by_side(server, browser):
    """A router without keys behind Serve's proxy (its route prefix is the root_path there too), and no model
    with two backends: no key asked for, a panel per model."""
    from playwright.sync_api import expect

    models = [{"name": "alpha", "backends": [synthetic("a", ttft_ms=50)]},
              {"name": "beta", "backends": [synthetic("b", ttft_ms=150)]}]
    with deployed(server, "open", models, router={"port": None}) as url, \
            open_tab(browser, url.removesuffix("/v1") + "/playground") as tab:
        page = tab.page
        panels = page.locator(".panel")
        expect(panels).to_have_count(2)
        expect(page.locator("#key")).to_be_hidden()
        assert panels.locator(".target").evaluate_all("els => els.map(e => e.value)") == ["alpha", "beta"]
        page.click("#add-panel")  # any model or backend: the next one not shown yet
        expect(panels.nth(2).locator(".target")).to_have_value("alpha@a")
        panels.nth(2).locator(".remove").click()
        expect(panels).to_have_count(2)
        panels.nth(1).locator(".max_tokens").fill("8")
        panels.nth(1).locator(".apply-all").click()
        send_and_wait(page)
        for i, backend in enumerate(("a", "b")):
            expect(panels.nth(i).locator(".served")).to_contain_text(f"served by {backend}")
            assert stat(panels.nth(i), "tokens") == 8
        assert tab.console_errors == []
