// The live page of `latentgraph serve`: draws the system, streams an answer with the agents' events, lights
// each agent as it thinks, speaks and delivers, and fills a timeline with one row per round. Plain JavaScript
// talking only to the server that sent it; see docs/serve.md.
"use strict";

const KEY_STORAGE = "latentgraph.apiKey"; // the API key, for this tab only (sessionStorage)
const ACTIVITIES = ["thinking", "speaking", "delivering", "done"];
const SVG_NS = "http://www.w3.org/2000/svg";
const LOADING_RETRY_MS = 2000; // while the server loads its system
const FLASH_MS = 900; // how long an edge stays lit after a message went over it

const $ = (id) => document.getElementById(id);

// What the page knows; `lit` (agents some event named since the question was sent) is read by the tests.
const page = {
  graph: null, // the body of GET /v1/graph
  nodes: new Map(), // agent name -> its <g class="node"> in the drawing
  edges: new Map(), // edge name ("src->dst") -> its <g class="edge">
  flashes: new Map(), // edge name -> the timer that unlights it
  lit: new Set(),
  rounds: new Map(), // round -> its timeline row
  turns: new Map(), // "round/agent" -> what the turn did so far, and its cell
  controller: null, // aborts the answer being streamed
  handleEvent,
  resetRun,
};
window.latentgraphPage = page;

class PageError extends Error {}

// ---- talking to the server -------------------------------------------------------------------------------

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// The message of an error response: OpenAI's {"error": {"message": ...}}, else the HTTP status.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON: the status says it
  }
  return `the server answered ${response.status} ${response.statusText}`;
}

// The data of each server-sent event of a streamed response, as text.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "").replace(/\r$/, "")).join("\n");
      if (data) yield data;
    }
  }
}

// ---- status and errors -------------------------------------------------------------------------------------

function setStatus(text, state) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = state;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- the graph ---------------------------------------------------------------------------------------------

async function loadGraph() {
  clearTimeout(page.graphRetry);
  let response;
  try {
    response = await fetch("v1/graph", { headers: apiHeaders() });
  } catch (error) {
    setStatus("server unreachable", "error");
    showError(`cannot reach the server (${error.message}); is latentgraph serve still running?`);
    return;
  }
  if (response.status === 503 && response.headers.has("Retry-After")) {
    setStatus("loading the system…", "busy");
    page.graphRetry = setTimeout(loadGraph, LOADING_RETRY_MS);
    return;
  }
  if (!response.ok) {
    const message = await errorOf(response);
    setStatus("not ready", "error");
    if (response.status === 401) {
      showError(`${message}. On this page: enter the server's key under Settings → API key.`);
      $("settings").open = true;
      $("api-key").focus();
    } else {
      showError(message);
    }
    return;
  }
  clearError();
  page.graph = await response.json();
  $("model").textContent = page.graph.model;
  const maxTokens = $("max-tokens");
  maxTokens.max = page.graph.limits.max_tokens_cap;
  if (!maxTokens.dataset.touched) maxTokens.value = page.graph.limits.default_max_tokens;
  draw(page.graph);
  resetRun();
  setStatus("ready", "idle");
}

function draw(graph) {
  const drawing = graph.svg ? graphvizDrawing(graph.svg) : null;
  const svg = drawing || fallbackDrawing(graph);
  $("graph").replaceChildren(svg);
  // As wide as the panel, within limits: a wide graph keeps most of its natural size (its panel scrolls) to stay
  // readable, a small one grows a little, not to a poster.
  const natural = svg.viewBox.baseVal.width;
  svg.style.minWidth = `${Math.round(0.8 * natural)}px`;
  svg.style.maxWidth = `${Math.round(1.3 * natural)}px`;
  const note = $("graph-note");
  note.hidden = Boolean(drawing);
  note.textContent = drawing ? "" : `A simple layout drawn by the page: ${graph.note || "Graphviz's drawing failed"}.`;
  page.nodes.clear();
  page.edges.clear();
  // Graphviz puts each node and edge in a group whose <title> is its name; the page's own drawing too.
  for (const group of svg.querySelectorAll("g.node")) {
    const name = group.querySelector("title").textContent;
    group.dataset.agent = name;
    page.nodes.set(name, group);
  }
  for (const group of svg.querySelectorAll("g.edge")) {
    page.edges.set(group.querySelector("title").textContent, group);
  }
}

// Graphviz's SVG as an element of this page, scaled to its box; null if it does not parse.
function graphvizDrawing(text) {
  const parsed = new DOMParser().parseFromString(text, "image/svg+xml");
  if (parsed.querySelector("parsererror")) return null;
  const svg = document.importNode(parsed.documentElement, true);
  svg.removeAttribute("width");
  svg.removeAttribute("height");
  svg.classList.add("drawing");
  return svg;
}

function svgElement(name, attributes = {}, text = null) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== null) element.textContent = text;
  return element;
}

// Without Graphviz: agents in columns by their depth along the forward edges, feedback edges dashed below.
function fallbackDrawing(graph) {
  const width = 190, height = 66, gapX = 90, gapY = 34, pad = 24, loop = 56;
  const depth = new Map(graph.agents.map((agent) => [agent.name, 0]));
  const forward = graph.edges.filter((edge) => !edge.feedback);
  for (let pass = 0; pass < graph.agents.length; pass++) { // longest paths in a DAG settle within n passes
    for (const edge of forward) depth.set(edge.dst, Math.max(depth.get(edge.dst), depth.get(edge.src) + 1));
  }
  const columns = [];
  for (const agent of graph.agents) (columns[depth.get(agent.name)] ||= []).push(agent);
  const tallest = Math.max(...columns.map((column) => column.length));
  const box = new Map();
  columns.forEach((column, c) => column.forEach((agent, r) => {
    const offset = ((tallest - column.length) * (height + gapY)) / 2;
    box.set(agent.name, { x: pad + c * (width + gapX), y: pad + offset + r * (height + gapY) });
  }));
  const hasFeedback = graph.edges.some((edge) => edge.feedback);
  const total = {
    width: 2 * pad + columns.length * (width + gapX) - gapX,
    height: 2 * pad + tallest * (height + gapY) - gapY + (hasFeedback ? loop : 0),
  };
  const svg = svgElement("svg", { viewBox: `0 0 ${total.width} ${total.height}`, class: "drawing fallback",
    role: "img", "aria-label": "the system's graph" });
  const marker = svgElement("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
    markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svgElement("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" }));
  const defs = svgElement("defs");
  defs.append(marker);
  svg.append(defs);
  for (const edge of graph.edges) svg.append(fallbackEdge(edge, box.get(edge.src), box.get(edge.dst), width, height, loop));
  for (const agent of graph.agents) svg.append(fallbackNode(agent, box.get(agent.name), width, height));
  return svg;
}

function fallbackEdge(edge, from, to, width, height, loop) {
  const group = svgElement("g", { class: edge.feedback ? "edge feedback" : "edge" });
  group.append(svgElement("title", {}, `${edge.src}->${edge.dst}`));
  let points;
  if (!edge.feedback) { // right side of the sender to left side of the receiver
    const [x0, y0, x3, y3] = [from.x + width, from.y + height / 2, to.x, to.y + height / 2];
    const bend = (x3 - x0) / 2;
    points = [[x0, y0], [x0 + bend, y0], [x3 - bend, y3], [x3, y3]];
  } else { // under the boxes, from the sender's bottom back to the receiver's
    const [x0, x3] = edge.src === edge.dst ? [from.x + width * 0.7, to.x + width * 0.3]
      : [from.x + width / 2, to.x + width / 2];
    const [y0, y3] = [from.y + height, to.y + height];
    const low = Math.max(y0, y3) + loop;
    points = [[x0, y0], [x0, low], [x3, low], [x3, y3]];
  }
  const [p0, p1, p2, p3] = points;
  group.append(svgElement("path", { d: `M${p0} C${p1} ${p2} ${p3}`, "marker-end": "url(#arrow)" }));
  const middle = [0, 1].map((i) => (p0[i] + 3 * p1[i] + 3 * p2[i] + p3[i]) / 8); // the curve at t = 1/2
  const label = edge.mode === "text" ? "text" : edge.link_type || "latent";
  group.append(svgElement("text", { x: middle[0], y: middle[1] - 6, "text-anchor": "middle", class: "label" },
    edge.slot !== edge.src ? `${label}, slot ${edge.slot}` : label));
  return group;
}

function fallbackNode(agent, at, width, height) {
  const group = svgElement("g", { class: "node" });
  group.append(svgElement("title", {}, agent.name));
  if (agent.answer) {
    group.append(svgElement("rect", { x: at.x - 4, y: at.y - 4, width: width + 8, height: height + 8, rx: 13,
      class: "ring" }));
  }
  group.append(svgElement("rect", { x: at.x, y: at.y, width, height, rx: 10 }));
  const backbone = agent.backbone.split("/").pop();
  const lines = [agent.answer ? `${agent.name} (answer)` : agent.name,
    backbone.length > 28 ? `${backbone.slice(0, 27)}…` : backbone,
    `hidden ${agent.hidden_size}, ${agent.latent_steps} latent steps`];
  lines.forEach((line, i) => group.append(svgElement("text", { x: at.x + width / 2, y: at.y + 20 + i * 17,
    "text-anchor": "middle", class: i === 0 ? "name" : "detail" }, line)));
  return group;
}

// ---- lighting the agents -----------------------------------------------------------------------------------

function light(agent, activity) {
  if (agent === undefined || agent === null) return;
  page.lit.add(agent);
  const node = page.nodes.get(agent);
  if (!node) return;
  node.dataset.lit = "true";
  node.classList.remove(...ACTIVITIES.map((name) => `is-${name}`));
  node.classList.add(`is-${activity}`);
}

function flashEdge(name) {
  const group = page.edges.get(name);
  if (!group) return;
  group.classList.add("is-delivering");
  clearTimeout(page.flashes.get(name));
  page.flashes.set(name, setTimeout(() => group.classList.remove("is-delivering"), FLASH_MS));
}

// Once the answer is over, whatever order the events came in: every agent that took part shows as done.
function settle() {
  for (const agent of page.lit) light(agent, "done");
  for (const [name, timer] of page.flashes) {
    clearTimeout(timer);
    page.edges.get(name).classList.remove("is-delivering");
  }
  page.flashes.clear();
}

// The agent that sends on an edge: from the graph, else from the edge's name ("src->dst").
function senderOf(edgeName) {
  const edge = page.graph && page.graph.edges.find((e) => e.name === edgeName);
  return edge ? edge.src : edgeName.split("->")[0];
}

// ---- the timeline ------------------------------------------------------------------------------------------

function rowOf(round) {
  let row = page.rounds.get(round);
  if (row) return row;
  row = document.createElement("tr");
  row.dataset.round = round;
  row.dataset.state = "pending";
  const head = document.createElement("th");
  head.scope = "row";
  head.textContent = `Round ${round}`;
  row.append(head);
  const later = [...page.rounds.entries()].filter(([r]) => r > round).sort(([a], [b]) => a - b)[0];
  $("timeline").tBodies[0].insertBefore(row, later ? later[1] : null); // rows stay in order of rounds
  page.rounds.set(round, row);
  return row;
}

function turnOf(round, agent) {
  const key = `${round}/${agent}`;
  let turn = page.turns.get(key);
  if (turn) return turn;
  const cell = document.createElement("td");
  cell.dataset.agent = agent;
  turn = { cell, agent, round, started: false, thought: null, said: "", spoke: null, tokens: null, tools: 0,
    delivered: new Map(), seconds: null, finished: false };
  rowOf(round).append(cell);
  page.turns.set(key, turn);
  renderTurn(turn);
  return turn;
}

// A turn's cell from what is known of it: the same whatever order its events came in.
function renderTurn(turn) {
  const did = [];
  if (turn.thought !== null) did.push(`thought ${turn.thought} steps`);
  if (turn.tokens !== null) did.push(`said ${turn.tokens} tokens`);
  if (turn.tools) did.push(`${turn.tools} tool calls`);
  const deliveries = [...turn.delivered.entries()].sort(([a], [b]) => a.localeCompare(b))
    .map(([receiver, later]) => (later ? `${receiver} (next round)` : receiver));
  if (deliveries.length) did.push(`→ ${deliveries.join(", ")}`);
  const active = turn.started || did.length > 0 || turn.said;
  const state = turn.finished ? "done" : active ? "active" : "pending";
  const said = turn.spoke !== null ? turn.spoke : turn.said;
  const parts = [["who", turn.agent], ["what", did.join(" · ") || (state === "pending" ? "waiting" : "…")]];
  if (said) parts.push(["said", said]);
  parts.push(["time", turn.seconds !== null ? `${turn.seconds.toFixed(3)} s` : ""]);
  turn.cell.replaceChildren(...parts.map(([name, text]) => {
    const line = document.createElement("div");
    line.className = name;
    line.textContent = text;
    return line;
  }));
  turn.cell.dataset.state = state;
  turn.cell.title = said;
  const row = turn.cell.parentElement; // a round is over once each of its turns is (its RoundEnded may not come)
  if ([...row.cells].every((cell) => cell.tagName === "TH" || cell.dataset.state === "done")) row.dataset.state = "done";
}

function resetRun() {
  $("timeline").tBodies[0].replaceChildren();
  page.rounds.clear();
  page.turns.clear();
  page.lit.clear();
  for (const node of page.nodes.values()) {
    node.classList.remove(...ACTIVITIES.map((name) => `is-${name}`));
    delete node.dataset.lit;
  }
  if (!page.graph) return;
  page.graph.turns.forEach((agents, r) => agents.forEach((agent) => turnOf(r + 1, agent)));
}

// ---- the events --------------------------------------------------------------------------------------------

// One record of latentgraph/serve/records.py: light its agent, and note it in its turn's cell.
function handleEvent(event) {
  const round = event.round;
  if (event.type === "RoundEnded") {
    rowOf(round).dataset.state = "done";
    return;
  }
  if (event.type === "MessageDelivered") {
    const sender = senderOf(event.edge);
    light(sender, "delivering");
    flashEdge(event.edge);
    const turn = turnOf(round, sender);
    turn.delivered.set(event.receiver, Boolean(event.next_round));
    renderTurn(turn);
    return;
  }
  if (typeof event.agent !== "string") return; // an event the page does not show
  const turn = turnOf(round, event.agent);
  switch (event.type) {
    case "AgentStarted":
      light(event.agent, "thinking");
      turn.started = true;
      break;
    case "AgentThought":
      light(event.agent, "thinking");
      turn.thought = event.latent_steps;
      break;
    case "TokensDecoded": // pieces of what the agent says, as it decodes
      light(event.agent, "speaking");
      if (typeof event.text === "string") turn.said += event.text;
      break;
    case "AgentSpoke":
      light(event.agent, "speaking");
      turn.spoke = event.text;
      if (event.tokens_out !== undefined) turn.tokens = event.tokens_out;
      turn.tools = (event.tool_calls || []).length;
      break;
    case "AgentFinished":
      light(event.agent, "done");
      turn.finished = true;
      turn.seconds = event.seconds;
      break;
    default:
      light(event.agent, "thinking");
  }
  renderTurn(turn);
}

// ---- asking ------------------------------------------------------------------------------------------------

const SETTINGS = [["temperature", "temperature", "Temperature"], ["max-tokens", "max_tokens", "Max tokens"],
  ["seed", "seed", "Seed"]];

// The request's body from the form; the server checks the values and says what is wrong with them.
function requestBody(question) {
  const body = { model: page.graph.model, messages: [{ role: "user", content: question }], stream: true,
    stream_options: { include_usage: true }, latentgraph: { events: true } };
  for (const [id, field, label] of SETTINGS) {
    const input = $(id);
    if (input.validity.badInput) throw new PageError(`${label} must be a number`);
    if (input.value.trim() !== "") body[field] = Number(input.value);
  }
  return body;
}

function setAnswer(text, state) {
  const answer = $("answer");
  answer.textContent = text;
  answer.dataset.state = state;
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("stop").disabled = !busy;
}

async function ask(submitted) {
  submitted.preventDefault();
  if (page.controller) return;
  const question = $("question").value;
  if (!question.trim()) {
    showError("Type a question first.");
    $("question").focus();
    return;
  }
  if (!page.graph) await loadGraph();
  if (!page.graph) return; // loadGraph said why
  clearError();
  resetRun();
  $("answer-meta").textContent = "";
  const controller = new AbortController();
  page.controller = controller;
  setBusy(true);
  setStatus("answering…", "busy");
  setAnswer("", "streaming");
  const started = performance.now();
  let answer = "", finish = null, usage = null, complete = false;
  try {
    const response = await fetch("v1/chat/completions", { method: "POST", headers: apiHeaders(),
      body: JSON.stringify(requestBody(question)), signal: controller.signal });
    if (!response.ok) throw new PageError(await errorOf(response));
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") {
        complete = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new PageError(chunk.error.message);
      if (chunk.latentgraph) handleEvent(chunk.latentgraph.event);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) answer += choice.delta.content;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (chunk.usage) usage = chunk.usage;
      setAnswer(answer, "streaming");
    }
    if (!complete) throw new PageError("the answer stopped before its end: the server closed the stream");
    setAnswer(answer, "done");
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const tokens = usage ? `${usage.completion_tokens} tokens, ` : "";
    $("answer-meta").textContent = `finished (${finish === "length" ? "max tokens reached" : finish}), ${tokens}${seconds} s`;
    setStatus("ready", "idle");
  } catch (error) {
    if (error.name === "AbortError") {
      setAnswer(answer, "stopped");
      setStatus("stopped", "idle");
    } else {
      setAnswer(answer, "error");
      setStatus("failed", "error");
      showError(error instanceof PageError ? error.message : `the page failed: ${error.message}`);
    }
  } finally {
    page.controller = null;
    setBusy(false);
    settle();
  }
}

// ---- start -------------------------------------------------------------------------------------------------

function start() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    if (key.value.trim()) sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    else sessionStorage.removeItem(KEY_STORAGE);
    if (!page.graph) loadGraph();
  });
  $("max-tokens").addEventListener("input", (e) => { e.target.dataset.touched = "true"; });
  $("ask").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => page.controller && page.controller.abort());
  $("question").addEventListener("keydown", (e) => { // Ctrl+Enter (or Cmd+Enter) asks
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit();
  });
  loadGraph();
}

start();
