"use strict";
// The playground (README, Playground): one page over the gateway's REST API,
// served by the same Envoy, so every call is same-origin. Streams are read
// with fetch() rather than EventSource so that the authorization header is
// sent when API keys are on.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "agentlab.apiKey";
// The open execution's view (nodes, tokens, last event sequence): a reload
// restores it and resumes the watch from there with Last-Event-ID.
const VIEW_STORAGE = "agentlab.view";
// The run form's fields: a reload keeps what was typed and chosen.
const FORM_STORAGE = "agentlab.form";
const FORM_FIELDS = ["prompt", "model", "mode", "temperature", "max-tokens", "seed", "replay-model"];
// ListModels' name for the route that serves any other name.
const ANY_MODEL = "*";
const TERMINAL = new Set([
  "EXECUTION_STATE_SUCCEEDED",
  "EXECUTION_STATE_FAILED",
  "EXECUTION_STATE_CANCELLED",
]);
const STEP_STATUS = {
  STEP_STATUS_RUNNING: "running",
  STEP_STATUS_SUCCEEDED: "finished",
  STEP_STATUS_FAILED: "failed",
  STEP_STATUS_CANCELLED: "cancelled",
};

// ---- calls -----------------------------------------------------------------

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, authorization: `Bearer ${key}` } : { ...extra };
}

/** An Error carrying the gateway's google.rpc.Status message and HTTP status. */
async function callError(response) {
  let message = response.statusText;
  try {
    const status = await response.json();
    message = status.message || message;
  } catch (_) {
    // Not JSON: keep the status text.
  }
  const error = new Error(`${response.status}: ${message}`);
  error.status = response.status;
  return error;
}

async function call(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await callError(response);
  return response.json();
}

/** Calls onEvent with each Server-Sent Event's `event` object until the
 * stream ends. */
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (data) onEvent(JSON.parse(data).event);
    }
  }
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

async function guarded(action) {
  showError(null);
  try {
    await action();
  } catch (error) {
    if (error.name !== "AbortError") showError(error);
  }
}

// ---- the graph, the node cards and the chart -------------------------------

const cy = cytoscape({
  container: $("graph"),
  userZoomingEnabled: false,
  maxZoom: 1.2, // else one node fills the box
  style: [
    {
      selector: "node",
      style: {
        label: "data(label)",
        "text-valign": "center",
        "text-wrap": "wrap",
        "font-size": 10,
        shape: "round-rectangle",
        width: 110,
        height: 40,
        "background-color": "#ccc",
      },
    },
    { selector: 'node[status = "running"]', style: { "background-color": "#ffd54f" } },
    { selector: 'node[status = "finished"]', style: { "background-color": "#81c784" } },
    { selector: 'node[status = "failed"]', style: { "background-color": "#e57373" } },
    { selector: 'node[status = "cancelled"]', style: { "background-color": "#e57373" } },
    {
      selector: "edge",
      style: { "curve-style": "bezier", "target-arrow-shape": "triangle", width: 2 },
    },
  ],
});

const chart = new Chart($("chart"), {
  type: "bar",
  data: {
    labels: [],
    datasets: [
      { label: "time to first token (ms)", data: [], yAxisID: "ms", backgroundColor: "#64b5f6" },
      { label: "tokens/s", data: [], yAxisID: "rate", backgroundColor: "#ffb74d" },
    ],
  },
  options: {
    animation: false,
    maintainAspectRatio: false,
    scales: {
      ms: { position: "left", beginAtZero: true, title: { display: true, text: "ms" } },
      rate: { position: "right", beginAtZero: true, title: { display: true, text: "tokens/s" } },
    },
  },
});

// The view of one execution: its nodes in the order they started.
let view = emptyView();
let stream = null; // the AbortController of the stream being read
// Whether a run or a replay this page started is under way: its buttons
// stay disabled until it ends, so a double click starts one run, not two.
let busy = false;

function emptyView() {
  return { id: "", state: "", output: "", lastSequence: 0, nodes: [] };
}

function nodeKey(node, index) {
  return `${node.name}#${index}`;
}

function fmt(value, digits = 1) {
  return Number(value || 0).toFixed(digits);
}

function metricsText(metrics) {
  if (!metrics) return "";
  return (
    `tokens ${metrics.completion_tokens || 0} · TTFT ${fmt(metrics.time_to_first_token_ms)} ms · ` +
    `${fmt(metrics.tokens_per_second)} tokens/s · ${fmt(metrics.latency_ms)} ms`
  );
}

/** Redraws the graph, the cards, the chart and the header from `view`. */
function render() {
  $("execution-id").textContent = view.id;
  $("execution-state").textContent = view.state.replace("EXECUTION_STATE_", "");
  $("output").textContent = view.output;
  const open = Boolean(view.id);
  $("cancel").disabled = !open || TERMINAL.has(view.state);
  $("replay").disabled = busy || !open || !TERMINAL.has(view.state);
  $("run-stream").disabled = busy;
  $("run-execute").disabled = busy;

  cy.batch(() => {
    view.nodes.forEach((node, index) => {
      const id = nodeKey(node, index);
      const label = `${node.name}\n${node.status}`;
      const existing = cy.getElementById(id);
      if (existing.nonempty()) {
        existing.data({ status: node.status, label });
      } else {
        cy.add({ group: "nodes", data: { id, label, status: node.status, name: node.name } });
        if (index > 0) {
          cy.add({ group: "edges", data: { source: nodeKey(view.nodes[index - 1], index - 1), target: id } });
        }
      }
    });
  });
  if (cy.nodes().length !== view.nodes.length) {
    cy.elements().remove();
    return render();
  }
  cy.layout({ name: "grid", rows: 1, fit: true, padding: 10 }).run();

  const cards = $("nodes");
  view.nodes.forEach((node, index) => {
    let card = cards.children[index];
    if (!card) {
      card = document.createElement("div");
      card.className = "node-card";
      card.innerHTML = '<strong class="name"></strong> <span class="status"></span>' +
        '<div class="metrics"></div><div class="tokens"></div>';
      cards.appendChild(card);
    }
    card.dataset.node = node.name;
    card.dataset.status = node.status;
    card.querySelector(".name").textContent = node.name;
    card.querySelector(".status").textContent = node.status;
    card.querySelector(".metrics").textContent = metricsText(node.metrics);
    card.querySelector(".tokens").textContent = node.tokens;
  });
  while (cards.children.length > view.nodes.length) cards.lastChild.remove();

  const measured = view.nodes.filter((node) => node.metrics);
  chart.data.labels = measured.map((node) => node.name);
  chart.data.datasets[0].data = measured.map((node) => node.metrics.time_to_first_token_ms || 0);
  chart.data.datasets[1].data = measured.map((node) => node.metrics.tokens_per_second || 0);
  chart.update();
}

let saveTimer = null;
function saveView() {
  // Token events come fast: write at most every 200 ms.
  if (saveTimer) return;
  saveTimer = setTimeout(() => {
    saveTimer = null;
    sessionStorage.setItem(VIEW_STORAGE, JSON.stringify(view));
  }, 200);
}

let renderQueued = false;
function update() {
  saveView();
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render();
  });
}

function resetView(id = "") {
  cy.elements().remove();
  $("nodes").replaceChildren();
  view = emptyView();
  view.id = id;
  $("compare-panel").hidden = true;
  if (id) location.hash = `#/executions/${id}`;
  update();
}

/** Applies recorded steps (an Execute answer, a stored record, a failure). */
function applyFlow(flow) {
  (flow || []).forEach((step, index) => {
    const node = view.nodes[index] || { name: step.node, tokens: "" };
    node.name = step.node;
    node.status = STEP_STATUS[step.status] || "finished";
    node.metrics = step.metrics;
    if (step.output && step.output.length >= node.tokens.length) node.tokens = step.output;
    view.nodes[index] = node;
  });
}

function applyEvent(event) {
  if (event.sequence <= view.lastSequence) return; // seen before a reconnect
  view.lastSequence = event.sequence;
  if (event.execution_started) {
    view.id = view.id || event.execution_id;
    view.state = "EXECUTION_STATE_RUNNING";
    if (!location.hash.endsWith(view.id)) location.hash = `#/executions/${view.id}`;
  } else if (event.node_started) {
    view.nodes.push({ name: event.node_started.node, status: "running", tokens: "", metrics: null });
  } else if (event.token_delta) {
    const node = [...view.nodes].reverse().find((n) => n.name === event.token_delta.node);
    if (node) node.tokens += event.token_delta.text;
  } else if (event.node_finished) {
    const step = event.node_finished.step;
    const node = [...view.nodes].reverse().find((n) => n.name === step.node && n.status === "running");
    if (node) {
      node.status = STEP_STATUS[step.status] || "finished";
      node.metrics = step.metrics;
      if (!node.tokens) node.tokens = step.output || "";
    }
  } else if (event.execution_completed) {
    const result = event.execution_completed.result;
    applyFlow(result.flow);
    view.output = result.output;
    view.state = "EXECUTION_STATE_SUCCEEDED";
  } else if (event.execution_failed) {
    applyFlow(event.execution_failed.flow);
    const error = event.execution_failed.error || {};
    view.state = error.code === 1 ? "EXECUTION_STATE_CANCELLED" : "EXECUTION_STATE_FAILED";
    showError(new Error(`execution ended: ${error.message || "failed"}`));
  }
  update();
}

/** Follows the open execution's events until its end; a connection that
 * ends early is resumed with Last-Event-ID after a second. */
async function watch() {
  const controller = new AbortController();
  stream = controller;
  const id = view.id;
  while (!TERMINAL.has(view.state) && view.id === id && !controller.signal.aborted) {
    const extra = view.lastSequence ? { "last-event-id": String(view.lastSequence) } : {};
    try {
      const response = await fetch(`/api/v1/executions/${id}:watch`, {
        headers: headers(extra),
        signal: controller.signal,
      });
      if (!response.ok) throw await callError(response);
      await readEvents(response, applyEvent);
    } catch (error) {
      if (error.name === "AbortError" || error.status) throw error;
    }
    if (!TERMINAL.has(view.state)) await new Promise((done) => setTimeout(done, 1000));
  }
  if (TERMINAL.has(view.state)) await firstHistoryPage(); // it still lists the run as running
}

function stopStream() {
  if (stream) stream.abort();
  stream = null;
}

// ---- running ---------------------------------------------------------------

function runRequest() {
  const body = { prompt: $("prompt").value, model: $("model").value, mode: $("mode").value };
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  if (number("temperature") !== undefined) body.temperature = number("temperature");
  if (number("max-tokens") !== undefined) body.max_tokens = number("max-tokens");
  if (number("seed") !== undefined) body.seed = number("seed");
  return body;
}

async function runStreamed() {
  stopStream();
  resetView();
  const controller = new AbortController();
  stream = controller;
  const response = await fetch("/api/v1/orchestrate", {
    method: "POST",
    headers: headers({ "content-type": "application/json" }),
    // The run outlives this page (a reload resumes it; Cancel stops it).
    body: JSON.stringify({ ...runRequest(), on_disconnect: "DISCONNECT_POLICY_CONTINUE" }),
    signal: controller.signal,
  });
  if (!response.ok) throw await callError(response);
  try {
    await readEvents(response, applyEvent);
  } catch (error) {
    if (error.name === "AbortError") throw error;
  }
  // Cut before its end: the rest comes from the watch route.
  if (view.id && !TERMINAL.has(view.state)) await watch();
  firstHistoryPage();
}

async function runExecute() {
  stopStream();
  resetView();
  const result = await call("POST", "/api/v1/execute", runRequest());
  view.id = result.execution_id;
  location.hash = `#/executions/${view.id}`;
  applyFlow(result.flow);
  view.output = result.output;
  view.state = result.state || "EXECUTION_STATE_SUCCEEDED";
  update();
  firstHistoryPage();
}

/** Shows a stored execution; one still running is then watched live. */
async function openExecution(id) {
  stopStream();
  resetView(id);
  const { execution } = await call("GET", `/api/v1/executions/${id}`);
  applyRecord(execution);
  if (!TERMINAL.has(view.state)) await watch();
}

function applyRecord(execution) {
  view.state = execution.state;
  if (TERMINAL.has(execution.state)) {
    applyFlow(execution.result && execution.result.flow);
    view.output = (execution.result && execution.result.output) || "";
    view.lastSequence = execution.last_sequence || 0;
  }
  if (execution.error && execution.error.message) {
    showError(new Error(`execution ended: ${execution.error.message}`));
  }
  update();
}

async function cancelExecution() {
  const { execution } = await call("POST", `/api/v1/executions/${view.id}:cancel`, {});
  view.state = execution.state;
  update();
}

// ---- replay and compare ----------------------------------------------------

function diffHtml(ops) {
  const holder = document.createElement("span");
  for (const op of ops || []) {
    const tag = { DIFF_OP_KIND_INSERT: "ins", DIFF_OP_KIND_DELETE: "del" }[op.op] || "span";
    const part = document.createElement(tag);
    part.textContent = op.text;
    holder.appendChild(part);
  }
  return holder;
}

function signed(value, digits = 1) {
  const number = Number(value || 0);
  return `${number > 0 ? "+" : ""}${number.toFixed(digits)}`;
}

function deltaText(delta) {
  if (!delta) return "";
  return (
    `Δ tokens ${signed(delta.completion_tokens, 0)} · Δ TTFT ${signed(delta.time_to_first_token_ms)} ms · ` +
    `Δ ${signed(delta.tokens_per_second)} tokens/s · Δ ${signed(delta.duration_ms)} ms`
  );
}

function cell(row, content, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.appendChild(content);
  else td.textContent = content;
  row.appendChild(td);
  return td;
}

function withDelta(content, delta, isBaseline) {
  const holder = document.createElement("div");
  holder.appendChild(content instanceof Node ? content : document.createTextNode(content));
  if (!isBaseline) {
    const line = document.createElement("span");
    line.className = "delta";
    line.textContent = deltaText(delta);
    holder.appendChild(line);
  }
  return holder;
}

function renderComparison(comparison) {
  const table = $("compare");
  table.replaceChildren();
  const head = table.insertRow();
  cell(head, "");
  comparison.executions.forEach((execution, index) => {
    const model = execution.model || (execution.metrics && execution.metrics.model) || "default";
    const title = `${index === 0 ? "baseline" : "replay"}: ${model} ` +
      `(${execution.state.replace("EXECUTION_STATE_", "")}) ${execution.execution_id}`;
    const th = document.createElement("th");
    th.textContent = title;
    head.appendChild(th);
  });
  for (const node of comparison.nodes) {
    const row = table.insertRow();
    row.dataset.node = node.node;
    cell(row, `${node.node}${node.occurrence > 1 ? ` (${node.occurrence})` : ""}`);
    node.versions.forEach((version, index) => {
      const isBaseline = index === 0;
      let content;
      if (!version.present) content = "(not run)";
      else if (isBaseline) content = version.step.output;
      else content = diffHtml(version.output_diff);
      cell(row, withDelta(content, version.delta, isBaseline), isBaseline ? "baseline" : "compared");
      if (version.present) {
        row.lastChild.appendChild(Object.assign(document.createElement("span"), {
          className: "delta metrics", textContent: metricsText(version.step.metrics),
        }));
      }
    });
  }
  const total = table.insertRow();
  total.dataset.node = "total";
  cell(total, "whole output");
  comparison.executions.forEach((execution, index) => {
    const content = index === 0 ? execution.output : diffHtml(execution.output_diff);
    cell(total, withDelta(content, execution.delta, index === 0));
  });
  $("compare-panel").hidden = false;
}

async function replayAndCompare() {
  const source = view.id;
  const { execution } = await call("POST", `/api/v1/executions/${source}:replay`, {
    model: $("replay-model").value,
  });
  const comparison = await call("POST", "/api/v1/executions:compare", {
    execution_ids: [source, execution.execution_id],
  });
  renderComparison(comparison);
  firstHistoryPage();
}

// ---- models and history ----------------------------------------------------

async function loadModels() {
  const { models } = await call("GET", "/api/v1/models");
  for (const select of [$("model"), $("replay-model")]) {
    const chosen = select.value || savedForm[select.id] || "";
    select.replaceChildren();
    // "*" is the route for any other name, so a run may leave the model out;
    // with a routing file there is none and the service requires a model
    // (400), so the first ready model is chosen instead.
    const anyName = models.find((model) => model.name === ANY_MODEL);
    if (select.id === "model" && anyName) {
      select.appendChild(Object.assign(document.createElement("option"), {
        value: "", textContent: `(the service's default: ${anyName.backend})`,
      }));
    }
    if (select.id === "replay-model") {
      // An empty model replays on the run's own (ReplayExecutionRequest.model).
      select.appendChild(Object.assign(document.createElement("option"), {
        value: "", textContent: "(the run's own model)",
      }));
    }
    // "*" routes any other name: sent as a model, it would be recorded as
    // the name "*"; the "service's default" option above stands for it.
    for (const model of models.filter((model) => model.name !== ANY_MODEL)) {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = `${model.name} (${model.backend}${model.ready ? "" : ", unreachable"})`;
      option.disabled = !model.ready;
      select.appendChild(option);
    }
    if (chosen) select.value = chosen;
    if (select.selectedOptions.length === 0 || select.selectedOptions[0].disabled) {
      const ready = [...select.options].find((option) => !option.disabled);
      if (ready) select.value = ready.value;
    }
  }
}

// The page shown, the next one, and the tokens of the pages before it
// (the API pages forward only: Previous goes back through these).
const historyPages = { current: "", next: "", before: [], asked: 0 };

/** The first page again (a filter changed, a run ended), then Next and
 * Previous from there. */
function firstHistoryPage() {
  historyPages.before = [];
  return refreshHistory();
}

async function nextHistoryPage() {
  const from = historyPages.current;
  await refreshHistory(historyPages.next);
  historyPages.before.push(from);
}

async function previousHistoryPage() {
  await refreshHistory(historyPages.before.pop() || "");
}

async function refreshHistory(pageToken = "") {
  // Filters change quickly: only the latest request's answer is shown, and
  // the table is aria-busy until it is (screen readers, and the tests, wait
  // for that rather than for rows an older answer may replace).
  const asked = ++historyPages.asked;
  $("history").setAttribute("aria-busy", "true");
  try {
    await showHistory(asked, pageToken);
  } finally {
    if (asked === historyPages.asked) $("history").removeAttribute("aria-busy");
  }
}

async function showHistory(asked, pageToken) {
  const query = new URLSearchParams({ page_size: "10" });
  if ($("history-model").value.trim()) query.set("model", $("history-model").value.trim());
  if ($("history-state").value) query.set("state", $("history-state").value);
  if (pageToken) query.set("page_token", pageToken);
  const page = await call("GET", `/api/v1/executions?${query}`);
  if (asked !== historyPages.asked) return;
  historyPages.current = pageToken;
  historyPages.next = page.next_page_token || "";
  $("history-next").disabled = !historyPages.next;
  $("history-previous").disabled = !pageToken;
  const body = $("history").tBodies[0];
  body.replaceChildren();
  for (const execution of page.executions || []) {
    const row = body.insertRow();
    row.dataset.id = execution.execution_id;
    cell(row, execution.create_time || "");
    cell(row, execution.model || "(default)");
    cell(row, execution.state.replace("EXECUTION_STATE_", ""));
    cell(row, (execution.prompt || "").slice(0, 80));
    const open = document.createElement("button");
    open.textContent = "Open";
    open.className = "open";
    open.addEventListener("click", () => guarded(() => openExecution(execution.execution_id)));
    cell(row, open);
  }
}

// ---- start -----------------------------------------------------------------

/** Runs `action` with the run and replay buttons disabled; a click while
 * they are (a double click's second) does nothing. */
async function whileBusy(action) {
  if (busy) return;
  busy = true;
  render();
  try {
    await action();
  } finally {
    busy = false;
    render();
  }
}

function bind(id, action) {
  $(id).addEventListener("click", () => guarded(action));
}

const savedForm = JSON.parse(sessionStorage.getItem(FORM_STORAGE) || "{}");
for (const id of FORM_FIELDS) {
  // The pickers get their options from the gateway: loadModels() chooses
  // the saved model once they are there.
  if (savedForm[id] !== undefined && $(id).tagName !== "SELECT") $(id).value = savedForm[id];
  $(id).addEventListener("change", saveForm);
  $(id).addEventListener("input", saveForm);
}
if (savedForm.mode) $("mode").value = savedForm.mode;

function saveForm() {
  const form = Object.fromEntries(FORM_FIELDS.map((id) => [id, $(id).value]));
  sessionStorage.setItem(FORM_STORAGE, JSON.stringify(form));
}

$("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  guarded(async () => {
    await loadModels();
    await firstHistoryPage();
  });
});
bind("run-stream", () => whileBusy(runStreamed));
bind("run-execute", () => whileBusy(runExecute));
bind("cancel", cancelExecution);
bind("replay", () => whileBusy(replayAndCompare));
bind("history-refresh", () => refreshHistory(historyPages.current));
bind("history-next", nextHistoryPage);
bind("history-previous", previousHistoryPage);
$("history-model").addEventListener("change", () => guarded(firstHistoryPage));
$("history-state").addEventListener("change", () => guarded(firstHistoryPage));

/** After a reload: the execution named in the address, restored from the
 * saved view and resumed from its last event, or opened afresh. */
async function resume() {
  const match = /^#\/executions\/([0-9a-f]{32})$/.exec(location.hash);
  if (!match) return;
  const saved = JSON.parse(sessionStorage.getItem(VIEW_STORAGE) || "null");
  if (saved && saved.id === match[1] && !TERMINAL.has(saved.state)) {
    view = saved;
    update();
    await watch();
  } else {
    await openExecution(match[1]);
  }
}

window.playground = { cy, chart, view: () => view };
guarded(async () => {
  await loadModels();
  await firstHistoryPage();
  await resume();
});
