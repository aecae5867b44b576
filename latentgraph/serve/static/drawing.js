// The system's drawing on the live page: Graphviz's SVG from the server or, when the server has no Graphviz, a
// simple layout drawn here. Both put each agent in a <g class="node"> and each edge in a <g class="edge"> whose
// <title> is its name: that is how the page finds what to light.

const SVG_NS = "http://www.w3.org/2000/svg";

// The drawing of `graph` (the body of GET /v1/graph): its <svg>, whether the page drew it, and its groups by name.
export function drawGraph(graph) {
  const graphviz = graph.svg ? graphvizDrawing(graph.svg) : null;
  const svg = graphviz || fallbackDrawing(graph);
  // As wide as its box, within limits: a wide graph keeps most of its natural size (its panel scrolls) to stay
  // readable, a small one grows a little, not to a poster.
  const natural = svg.viewBox.baseVal.width;
  svg.style.minWidth = `${Math.round(0.8 * natural)}px`;
  svg.style.maxWidth = `${Math.round(1.3 * natural)}px`;
  const titled = (selector) => new Map([...svg.querySelectorAll(selector)]
    .map((group) => [group.querySelector("title").textContent, group]));
  return { svg, drawnByPage: !graphviz, nodes: titled("g.node"), edges: titled("g.edge") };
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
  for (const edge of graph.edges) {
    svg.append(fallbackEdge(edge, box.get(edge.src), box.get(edge.dst), width, height, loop));
  }
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
