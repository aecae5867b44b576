// The live page's timeline: one row per round, one cell per agent's turn, showing what the turn did (its latent
// steps, the tokens it said, whom it delivered to) and its seconds. A cell is drawn from everything known of its
// turn, so the events may come in any order.

export class Timeline {
  constructor(body) {
    this.body = body; // the table's <tbody>
    this.rows = new Map(); // round -> its <tr>
    this.turns = new Map(); // "round/agent" -> what the turn did so far, and its cell
  }

  // Empty, with a waiting cell for each planned turn: `planned[r - 1]` lists round r's agents in order.
  reset(planned) {
    this.body.replaceChildren();
    this.rows.clear();
    this.turns.clear();
    planned.forEach((agents, r) => agents.forEach((agent) => this.turn(r + 1, agent)));
  }

  // The turn of `agent` in `round`, with a cell (at the end of its row when the turn was not planned).
  turn(round, agent) {
    const key = `${round}/${agent}`;
    let turn = this.turns.get(key);
    if (turn) return turn;
    turn = { cell: document.createElement("td"), agent, started: false, thought: null, said: "", spoke: null,
      tokens: null, tools: 0, delivered: new Map(), seconds: null, finished: false };
    turn.cell.dataset.agent = agent;
    this.row(round).append(turn.cell);
    this.turns.set(key, turn);
    this.show(turn);
    return turn;
  }

  row(round) {
    let row = this.rows.get(round);
    if (row) return row;
    row = document.createElement("tr");
    row.dataset.round = round;
    row.dataset.state = "pending";
    const head = document.createElement("th");
    head.scope = "row";
    head.textContent = `Round ${round}`;
    row.append(head);
    const later = [...this.rows.entries()].filter(([r]) => r > round).sort(([a], [b]) => a - b)[0];
    this.body.insertBefore(row, later ? later[1] : null); // rows stay in the order of their rounds
    this.rows.set(round, row);
    return row;
  }

  // Draw the turn's cell from what is known of it.
  show(turn) {
    const did = [];
    if (turn.thought !== null) did.push(`thought ${turn.thought} steps`);
    if (turn.tokens !== null) did.push(`said ${turn.tokens} tokens`);
    if (turn.tools) did.push(`${turn.tools} tool calls`);
    const deliveries = [...turn.delivered.entries()].sort(([a], [b]) => a.localeCompare(b))
      .map(([receiver, nextRound]) => (nextRound ? `${receiver} (next round)` : receiver));
    if (deliveries.length) did.push(`→ ${deliveries.join(", ")}`);
    const state = turn.finished ? "done" : turn.started || did.length || turn.said ? "active" : "pending";
    const said = turn.spoke !== null ? turn.spoke : turn.said; // the whole text, else the pieces so far
    const doing = { pending: "waiting", active: turn.said ? "speaking…" : "…", done: "" }[state];
    const lines = [["who", turn.agent], ["what", did.join(" · ") || doing]];
    if (said) lines.push(["said", said]);
    lines.push(["time", turn.seconds !== null ? `${turn.seconds.toFixed(3)} s` : ""]);
    turn.cell.replaceChildren(...lines.map(([name, text]) => {
      const line = document.createElement("div");
      line.className = name;
      line.textContent = text;
      return line;
    }));
    turn.cell.dataset.state = state;
    turn.cell.title = said;
    const row = turn.cell.parentElement; // a round is over once each of its turns is
    if ([...row.cells].every((cell) => cell.tagName === "TH" || cell.dataset.state === "done")) {
      row.dataset.state = "done";
    }
  }
}
