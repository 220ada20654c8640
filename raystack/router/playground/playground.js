// The raystack playground (raystack/router/playground.py says what and why). A plain ES module with no
// dependencies: it calls the router's own /v1 on this origin and times each answer on the stream it receives.

// The router's /v1, beside /playground under whatever root_path the router has (this file is playground/*.js).
const API = new URL("../v1/", import.meta.url);
// Session storage: the key stays in this tab and is gone when it closes; nothing else keeps it.
const KEY_STORE = "raystack.playground.key";
const MAX_PANELS = 6;
const PARAMS = ["temperature", "max_tokens", "top_p"];
// HTTP/2 proxies send no reason phrase: the statuses a person meets here, named.
const STATUS_NAMES = {
  400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
  413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
  503: "Service Unavailable", 504: "Gateway Timeout",
};

const $ = (id) => document.getElementById(id);

const state = {
  models: [],      // /v1/models' entries this key may use: {id, backends, parent}
  panels: [],      // {node, select, inputs, ...} in page order
  keysOn: false,   // the router asked for a key
  running: null,   // the AbortController of the prompt under way
};

// ---- the key ----

function storedKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** A refused request as a person reads it: the status, the OpenAI error's message, and when to retry. */
async function refusalText(response) {
  let message = "";
  try {
    message = (await response.json())?.error?.message || "";
  } catch {
    // not JSON (a gateway's own page): the status says what there is to say
  }
  const name = STATUS_NAMES[response.status] || response.statusText;
  const retry = response.headers.get("retry-after");
  return `${response.status} ${name}${message ? `: ${message}` : ""}${retry ? ` Retry after ${retry} s.` : ""}`;
}

function showKeyForm(message) {
  $("key").hidden = false;
  $("key-form").hidden = false;
  $("key-set").hidden = true;
  $("key-message").textContent = message;
  $("key-input").focus();
}

function showKeySet() {
  $("key").hidden = false;
  $("key-form").hidden = true;
  $("key-set").hidden = false;
  $("key-message").textContent = "";
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) {
    $("key-message").textContent = "Type a key first.";
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  $("key-input").value = "";
  loadModels();
});

$("key-forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORE);
  loadModels();
});

// ---- the models ----

function setStatus(text) {
  $("status").textContent = text;
}

/** Nothing of the last key's models stays on the page once it no longer applies. */
function clearModels() {
  state.models = [];
  setPanels([]);
  $("model").replaceChildren();
  $("choose").hidden = true;
  $("prompt-form").hidden = true;
  $("code").hidden = true;
}

async function loadModels() {
  let response;
  try {
    response = await fetch(new URL("models", API), { headers: requestHeaders() });
  } catch (err) {
    clearModels();
    setStatus(`The router did not answer: ${err.message}`);
    return;
  }
  if (response.status === 401) {
    const refusal = await refusalText(response);
    const hadKey = Boolean(storedKey());
    sessionStorage.removeItem(KEY_STORE);  // refused: not offered again on reload
    state.keysOn = true;
    clearModels();
    setStatus("");
    showKeyForm(hadKey ? refusal : "This router needs an API key: enter yours to see the models it may use.");
    return;
  }
  if (!response.ok) {
    clearModels();
    setStatus(`The models could not be listed: ${await refusalText(response)}`);
    return;
  }
  state.keysOn = state.keysOn || Boolean(storedKey());
  if (state.keysOn) showKeySet();
  else $("key").hidden = true;
  const listed = (await response.json()).data || [];
  state.models = listed.map((m) => ({ id: m.id, backends: m.backends || [], parent: m.parent || null }));
  if (!state.models.length) {
    clearModels();
    setStatus(state.keysOn ? "This key may use no model of this router." : "No model is served yet.");
    return;
  }
  setStatus("");
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(m.parent ? `${m.id} (adapter of ${m.parent})` : m.id, m.id)));
  const start = state.models.find((m) => m.backends.length > 1);
  $("choose").hidden = false;
  $("prompt-form").hidden = false;
  if (start) {
    select.value = start.id;
    setPanels(backendTargets(start));
  } else {
    setPanels(state.models.slice(0, 2).map((m) => m.id));  // no model with two backends: two models
  }
}

/** One target per backend, pinned model@backend. */
function backendTargets(model) {
  return model.backends.length ? model.backends.map((b) => `${model.id}@${b}`) : [model.id];
}

function allTargets() {
  return state.models.flatMap((m) => [m.id, ...m.backends.map((b) => `${m.id}@${b}`)]);
}

function selectedModel() {
  return state.models.find((m) => m.id === $("model").value);
}

$("model").addEventListener("change", () => setPanels(backendTargets(selectedModel())));
$("per-backend").addEventListener("click", () => setPanels(backendTargets(selectedModel())));
$("add-panel").addEventListener("click", () => {
  const used = new Set(state.panels.map((p) => p.select.value));
  const targets = allTargets();
  addPanel(targets.find((t) => !used.has(t)) || targets[0], readParams(state.panels.at(-1)));
  renderCode();
});

// ---- the panels ----

/** Panels for `targets`, each keeping the parameters of the panel it replaces. */
function setPanels(targets) {
  const kept = state.panels.map(readParams);
  for (const panel of state.panels) panel.node.remove();
  state.panels = [];
  targets.slice(0, MAX_PANELS).forEach((target, i) => addPanel(target, kept[i]));
  renderCode();
}

function addPanel(target, params) {
  const node = $("panel-template").content.firstElementChild.cloneNode(true);
  const panel = {
    node,
    select: node.querySelector(".target"),
    inputs: Object.fromEntries(PARAMS.map((name) => [name, node.querySelector(`.${name}`)])),
    stats: Object.fromEntries([...node.querySelectorAll("[data-stat]")].map((dd) => [dd.dataset.stat, dd])),
    served: node.querySelector(".served"),
    reasoning: node.querySelector(".reasoning"),
    content: node.querySelector(".content"),
    error: node.querySelector(".error"),
  };
  panel.select.replaceChildren(...allTargets().map((t) => new Option(t, t)));
  panel.select.value = target;
  if (params) writeParams(panel, params);
  panel.select.addEventListener("change", renderCode);
  for (const input of Object.values(panel.inputs)) input.addEventListener("input", renderCode);
  node.querySelector(".remove").addEventListener("click", () => removePanel(panel));
  node.querySelector(".apply-all").addEventListener("click", () => {
    const params = readParams(panel);
    for (const other of state.panels) writeParams(other, params);
    renderCode();
  });
  $("panels").append(node);
  state.panels.push(panel);
  updatePanelControls();
}

function removePanel(panel) {
  panel.node.remove();
  state.panels = state.panels.filter((p) => p !== panel);
  updatePanelControls();
  renderCode();
}

function updatePanelControls() {
  $("add-panel").disabled = state.panels.length >= MAX_PANELS;
  for (const panel of state.panels) panel.node.querySelector(".remove").hidden = state.panels.length < 2;
  $("panels").dataset.count = String(state.panels.length);
}

/** The parameter fields as typed (strings), to copy between panels. */
function readParams(panel) {
  return panel && Object.fromEntries(PARAMS.map((name) => [name, panel.inputs[name].value]));
}

function writeParams(panel, params) {
  for (const name of PARAMS) panel.inputs[name].value = params[name];
}

/** The parameters to send: an empty field is left to the engine's default; an invalid one says why. */
function sampling(panel) {
  const params = {};
  for (const name of PARAMS) {
    const input = panel.inputs[name];
    const raw = input.value.trim();
    if (raw === "") continue;
    if (!input.checkValidity()) throw new Error(`${name}: ${input.validationMessage}`);
    params[name] = name === "max_tokens" ? parseInt(raw, 10) : Number(raw);
  }
  return params;
}

function requestBody(panel) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: $("prompt").value });
  return {
    model: panel.select.value, messages, ...sampling(panel),
    stream: true, stream_options: { include_usage: true },  // the last chunk carries the usage: exact tokens
  };
}

// ---- sending and timing ----

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    $("prompt-form").requestSubmit();
  }
});

$("prompt-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (state.running) return;
  if (!$("prompt").value.trim()) {
    setStatus("Type a prompt first.");
    return;
  }
  setStatus("");
  const controller = new AbortController();
  state.running = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    await Promise.all(state.panels.map((panel) => streamInto(panel, controller.signal)));
  } finally {
    state.running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
});

$("stop").addEventListener("click", () => state.running?.abort());

function resetPanel(panel) {
  panel.reasoning.replaceChildren();
  panel.content.replaceChildren();
  panel.error.textContent = "";
  panel.served.textContent = "";
  panel.node.classList.remove("failed", "done");
  for (const dd of Object.values(panel.stats)) {
    dd.textContent = "\u2013";
    delete dd.dataset.value;
  }
}

function showError(panel, text) {
  panel.error.textContent = text;
  panel.node.classList.add("failed");
}

/** The events' data of a server-sent event stream, as they complete. */
async function* serverSentEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    // Line ends as \n; a \r last in a read may be half of a \r\n still to come.
    buffer = (buffer + value).replace(/\r\n|\r(?!$)/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

/** One panel's request: sent, streamed into the panel, timed from the fetch's start to each token's arrival. */
async function streamInto(panel, signal) {
  resetPanel(panel);
  let body;
  try {
    body = requestBody(panel);
  } catch (err) {
    showError(panel, err.message);
    return;
  }
  const timing = { started: performance.now(), first: null, last: null, chunks: 0, tokens: null };
  panel.node.classList.add("streaming");
  try {
    const response = await fetch(new URL("chat/completions", API), {
      method: "POST", headers: requestHeaders(), body: JSON.stringify(body), signal,
    });
    if (!response.ok) {
      showError(panel, await refusalText(response));
      return;
    }
    const backend = response.headers.get("x-raystack-backend");
    const replica = response.headers.get("x-raystack-replica");
    if (backend) panel.served.textContent = `served by ${backend}${replica ? `, replica ${replica}` : ""}`;
    for await (const data of serverSentEvents(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) {  // the engine failed after the answer began
        showError(panel, `The answer broke off: ${chunk.error.message}`);
        break;
      }
      if (chunk.usage?.completion_tokens != null) timing.tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices?.[0]?.delta || {};
      const reasoning = delta.reasoning_content || delta.reasoning || "";
      const content = delta.content || "";
      if (!reasoning && !content) continue;  // a role-only or usage-only chunk is no token
      const now = performance.now();
      timing.first ??= now;
      timing.last = now;
      timing.chunks += 1;
      if (reasoning) panel.reasoning.append(reasoning);  // text nodes: an answer is never markup
      if (content) panel.content.append(content);
      showStats(panel, timing);
    }
    panel.node.classList.add("done");
  } catch (err) {
    showError(panel, err.name === "AbortError" ? "Stopped." : `The stream broke off: ${err.message}`);
  } finally {
    showStats(panel, timing);
    panel.node.classList.remove("streaming");
  }
}

function setStat(panel, name, value, text) {
  const dd = panel.stats[name];
  if (value == null || !Number.isFinite(value)) return;
  dd.textContent = text(value);
  dd.dataset.value = String(Math.round(value * 10) / 10);  // what a test reads: the number, not its format
}

/** TTFT, time per output token, tokens/s and tokens; the tokens are the usage's once it comes, else the chunks. */
function showStats(panel, timing) {
  if (timing.first == null) return;
  const tokens = timing.tokens ?? timing.chunks;
  setStat(panel, "ttft", timing.first - timing.started, (v) => `${Math.round(v)} ms`);
  if (tokens > 1 && timing.last > timing.first) {
    setStat(panel, "tpot", (timing.last - timing.first) / (tokens - 1), (v) => `${v.toFixed(1)} ms`);
  }
  if (timing.last > timing.started) {
    setStat(panel, "rate", tokens / ((timing.last - timing.started) / 1000), (v) => v.toFixed(1));
  }
  setStat(panel, "tokens", tokens, (v) => String(v));
}

// ---- show code ----

$("show-code").addEventListener("click", () => {
  const open = $("code").hidden;
  $("code").hidden = !open;
  $("show-code").setAttribute("aria-expanded", String(open));
  $("show-code").textContent = open ? "Hide code" : "Show code";
  renderCode();
  if (open) $("code").scrollIntoView({ block: "nearest" });
});
$("prompt").addEventListener("input", renderCode);
$("system").addEventListener("input", renderCode);

const shellQuote = (text) => `'${text.replaceAll("'", "'\\''")}'`;

function curlCommand(body) {
  const lines = [`curl -N ${new URL("chat/completions", API).href}`, "  -H 'Content-Type: application/json'"];
  if (state.keysOn) lines.push('  -H "Authorization: Bearer $RAYSTACK_API_KEY"');
  lines.push(`  -d ${shellQuote(JSON.stringify(body, null, 2))}`);
  return lines.join(" \\\n");
}

/** The openai-python call; a JSON string is a Python string literal too. */
function pythonCall(body) {
  const { model, messages, stream: _stream, stream_options: _usage, ...params } = body;
  const key = state.keysOn ? 'os.environ["RAYSTACK_API_KEY"]' : '"unused"';
  return [
    ...(state.keysOn ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(API.href.replace(/\/$/, ""))},`,
    `                api_key=${key})`,
    "stream = client.chat.completions.create(",
    `    model=${JSON.stringify(model)},`,
    "    messages=[",
    ...messages.map((m) => `        {"role": ${JSON.stringify(m.role)}, "content": ${JSON.stringify(m.content)}},`),
    "    ],",
    ...Object.entries(params).map(([name, value]) => `    ${name}=${value},`),
    "    stream=True,",
    ")",
    "for chunk in stream:",
    '    print(chunk.choices[0].delta.content or "", end="", flush=True)',
  ].join("\n");
}

function codeBlock(language, text) {
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  code.className = `language-${language}`;
  code.textContent = text;
  pre.append(code);
  return pre;
}

function renderCode() {
  if ($("code").hidden) return;
  const blocks = state.panels.map((panel) => {
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = panel.select.value;
    figure.append(caption);
    try {
      const body = requestBody(panel);
      figure.append(codeBlock("shell", curlCommand(body)), codeBlock("python", pythonCall(body)));
    } catch (err) {
      const problem = document.createElement("p");
      problem.className = "error";
      problem.textContent = err.message;
      figure.append(problem);
    }
    return figure;
  });
  $("code-blocks").replaceChildren(...blocks);
}

loadModels();
