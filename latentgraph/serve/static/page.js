// The live page of `latentgraph serve`: draws the system, streams an answer with the agents' events, lights
// each agent as it thinks, speaks and delivers, and fills a timeline with one row per round. Plain JavaScript
// talking only to the server that sent it (a module: strict, run once the page is parsed); see docs/serve.md.

import { drawGraph } from "./drawing.js";
import { Timeline } from "./timeline.js";

const KEY_STORAGE = "latentgraph.apiKey"; // the API key, for this tab only (sessionStorage)
const ACTIVITIES = ["thinking", "speaking", "delivering", "done"];
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
  timeline: new Timeline($("timeline").tBodies[0]),
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
  const drawing = drawGraph(graph);
  $("graph").replaceChildren(drawing.svg);
  const note = $("graph-note");
  note.hidden = !drawing.drawnByPage;
  const why = graph.note || "Graphviz's drawing did not parse";
  note.textContent = drawing.drawnByPage ? `A simple layout drawn by the page: ${why}.` : "";
  page.nodes = drawing.nodes;
  page.edges = drawing.edges;
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

function resetRun() {
  page.lit.clear();
  for (const node of page.nodes.values()) {
    node.classList.remove(...ACTIVITIES.map((name) => `is-${name}`));
    delete node.dataset.lit;
  }
  page.timeline.reset(page.graph ? page.graph.turns : []);
}

// ---- the events --------------------------------------------------------------------------------------------

// One record of latentgraph/serve/records.py: light its agent, and note it in its turn's cell.
function handleEvent(event) {
  const timeline = page.timeline;
  if (event.type === "MessageDelivered") {
    const sender = senderOf(event.edge);
    light(sender, "delivering");
    flashEdge(event.edge);
    const turn = timeline.turn(event.round, sender);
    turn.delivered.set(event.receiver, Boolean(event.next_round));
    timeline.show(turn);
    return;
  }
  if (typeof event.agent !== "string") return; // an event the page does not show (RoundEnded, say)
  const turn = timeline.turn(event.round, event.agent);
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
  timeline.show(turn);
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
    const why = finish === "length" ? "max tokens reached" : finish;
    $("answer-meta").textContent = `finished (${why}), ${tokens}${seconds} s`;
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
