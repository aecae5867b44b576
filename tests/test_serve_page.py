"""The live page at ``/``, in a real headless Chromium (the system's, driven by Playwright) against a real server
on a tiny system: the page streams the same answer the API gives, lights every agent, fills its timeline from
the events in any order, draws the graph itself without Graphviz, sends the API key, and shows errors."""

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from serving import WAIT, running
from systems import sequential

from latentgraph import render
from latentgraph.serve.page import STATIC

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
QUESTION = "What is 17 * 23?"
KEY = "page-test-key"


@pytest.fixture(scope="module")
def system(tiny):
    torch.manual_seed(0)
    return sequential(tiny)


@pytest.fixture(scope="module")
def served(system):
    with running(system) as served:
        yield served.url


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium under Playwright; in CI it must be there (.ci/run installs it), elsewhere the test skips."""
    if not (Path(CHROMIUM).exists() or os.environ.get("CI")):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Visit:
    """A page in its own browser context, with every request it made and every error it logged."""

    page: object
    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        """Nothing came from elsewhere than the server, and the console stayed free of errors."""
        assert self.requests and all(url.startswith(self.origin + "/") or url.startswith("data:")
                                     for url in self.requests), self.requests
        assert self.errors == []


@pytest.fixture
def open_page(browser):
    contexts = []

    def open_(url: str) -> Visit:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT * 1000)
        visit = Visit(page, url)
        page.on("request", lambda request: visit.requests.append(request.url))
        page.on("console", lambda message: message.type == "error" and visit.errors.append(message.text))
        page.on("pageerror", lambda error: visit.errors.append(str(error)))
        page.goto(url)
        return visit

    yield open_
    for context in contexts:
        context.close()


def api_answer(url: str, question: str, *, key: str | None = None, **settings) -> str:
    """The API's whole (not streamed) greedy answer to ``question``."""
    response = chat(url, question, key=key, temperature=0, **settings)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def chat(url: str, question: str, *, key: str | None = None, **fields) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], **fields}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=WAIT)


def ask(page, question: str, **settings) -> None:
    """Type the question and the settings (ids of the form's inputs), submit, and wait for the answer's end."""
    page.fill("#question", question)
    for name, value in settings.items():
        page.fill(f"#{name.replace('_', '-')}", str(value))
    page.click("#submit")
    page.wait_for_selector("#answer[data-state=done], #answer[data-state=error]")


def drawn(page, selector: str) -> list[str]:
    """The titles of the drawing's groups matching ``selector`` (nodes or edges), in document order."""
    titles = "groups => groups.map(group => group.querySelector('title').textContent)"
    return page.eval_on_selector_all(f"#graph svg {selector}", titles)


def timeline(page) -> list[list[dict]]:
    """The timeline, one list of cells per row: each cell's agent, state and lines of text."""
    return page.eval_on_selector_all("#timeline tr", """rows => rows.map(row => [...row.cells].slice(1).map(cell => (
        {agent: cell.dataset.agent, state: cell.dataset.state, lines: [...cell.children].map(c => c.textContent)})))""")


def sse_records(body: bytes) -> list[dict]:
    """The agents' events in a streamed response's body."""
    chunks = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
    return [chunk["latentgraph"]["event"] for chunk in chunks if "latentgraph" in chunk]


def test_the_page_and_its_files_need_no_key_but_the_graph_does(system):
    with running(system, api_key=KEY) as served:
        page = httpx.get(served.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset, kind in [("page.js", "javascript"), ("drawing.js", "javascript"), ("timeline.js", "javascript"),
                            ("page.css", "text/css")]:
            response = httpx.get(f"{served.url}/static/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"]
            assert response.text == (STATIC / asset).read_text()
        assert httpx.get(served.url + "/static/missing.js").status_code == 404
        assert httpx.get(served.url + "/v1/graph").json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(served.url + "/v1/graph", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_graph_is_graphvizs_drawing_with_the_agents_edges_and_turns(served, system):
    graph = httpx.get(served + "/v1/graph", timeout=WAIT).json()
    diagram = render(system)
    svg = diagram.pipe(format="svg", encoding="utf-8")
    assert graph["svg"] == svg[svg.index("<svg"):] and graph["note"] is None
    assert graph["dot"] == diagram.source
    assert [agent["name"] for agent in graph["agents"]] == ["planner", "critic", "solver"]
    assert [agent["latent_steps"] for agent in graph["agents"]] == [3, 4, 2]
    assert [(e["name"], e["feedback"]) for e in graph["edges"]] == [
        ("planner->critic", False), ("critic->solver", False), ("solver->planner", True)]
    assert graph["turns"] == [["planner", "critic", "solver"]] * 3
    assert (graph["answer"], graph["rounds"], graph["model"]) == ("solver", 3, "tiny")
    assert graph["limits"] == {"max_tokens_cap": 1024, "default_max_tokens": 256}


def test_the_page_streams_the_apis_answer_lights_every_agent_and_times_each_turn(served, system, open_page):
    visit = open_page(served)
    page = visit.page
    page.wait_for_selector("#graph svg g.node")
    assert drawn(page, "g.node") == list(system.agents)
    assert page.get_attribute("#graph svg", "class") == "drawing"  # Graphviz's drawing, not the page's own
    with page.expect_response("**/v1/chat/completions") as streamed:
        ask(page, QUESTION, temperature=0, max_tokens=4)
    assert page.get_attribute("#answer", "data-state") == "done"
    assert page.eval_on_selector("#answer", "e => e.textContent") == api_answer(served, QUESTION, max_tokens=4)
    assert page.is_hidden("#error")
    assert sorted(drawn(page, "g.node[data-lit=true]")) == sorted(system.agents)
    assert sorted(page.evaluate("[...window.latentgraphPage.lit]")) == sorted(system.agents)

    records = sse_records(streamed.value.body())
    rows = timeline(page)
    assert [[cell["agent"] for cell in row] for row in rows] == [["planner", "critic", "solver"]] * 3
    assert all(cell["state"] == "done" for row in rows for cell in row)
    cells = {(r, cell["agent"]): " ".join(cell["lines"]) for r, row in enumerate(rows, 1) for cell in row}
    finished = [record for record in records if record["type"] == "AgentFinished"]
    assert len(finished) == 9
    for record in finished:
        assert cells[record["round"], record["agent"]].endswith(f"{record['seconds']:.3f} s")
    for record in records:
        if record["type"] == "AgentThought":
            assert f"thought {record['latent_steps']} steps" in cells[record["round"], record["agent"]]
        elif record["type"] == "MessageDelivered":
            sender = record["edge"].split("->")[0]
            assert record["receiver"] in cells[record["round"], sender].split("→")[1]
    spoke = next(record for record in records if record["type"] == "AgentSpoke")
    assert f"said {spoke['tokens_out']} tokens" in cells[3, "solver"] and spoke["text"] in cells[3, "solver"]
    visit.assert_clean()


def test_events_in_any_order_fill_the_same_timeline(served, system, open_page):
    response = chat(served, QUESTION, temperature=0, max_tokens=4, latentgraph={"events": True})
    events = [record["event"] for record in response.json()["latentgraph"]["events"]]
    visit = open_page(served)
    page = visit.page
    page.wait_for_selector("#graph svg g.node")
    feed = """events => { const page = window.latentgraphPage; page.resetRun(); events.forEach(page.handleEvent);
                          return [...page.lit].sort(); }"""
    shuffled = events[:]
    random.Random(0).shuffle(shuffled)
    seen = []
    for order in (events, events[::-1], shuffled):
        lit = page.evaluate(feed, order)
        seen.append((lit, timeline(page)))
    assert seen[0] == seen[1] == seen[2]
    lit, rows = seen[0]
    assert lit == sorted(system.agents)
    assert all(cell["state"] == "done" for row in rows for cell in row)
    # Before an agent's AgentSpoke, its cell shows what it said so far: the pieces of its TokensDecoded events.
    spoke = next(event for event in events if event["type"] == "AgentSpoke")
    pieces = [event["text"] for event in events if event["type"] == "TokensDecoded"]
    assert len(pieces) > 1 and "".join(pieces) == spoke["text"]
    page.evaluate(feed, [event for event in events if event["type"] != "AgentSpoke"])
    assert timeline(page)[2][2]["lines"][2] == spoke["text"]
    visit.assert_clean()


def test_without_graphviz_the_page_draws_the_graph_itself_and_lights_it(served, system, open_page, monkeypatch,
                                                                        tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no 'dot' program to be found
    graph = httpx.get(served + "/v1/graph", timeout=WAIT).json()
    assert graph["svg"] is None and "Graphviz 'dot' program" in graph["note"]
    assert graph["dot"] == render(system).source  # the DOT text needs no program
    visit = open_page(served)
    page = visit.page
    page.wait_for_selector("#graph svg.fallback g.node")
    assert drawn(page, "g.node") == list(system.agents)
    assert drawn(page, "g.edge") == ["planner->critic", "critic->solver", "solver->planner"]
    assert drawn(page, "g.edge.feedback") == ["solver->planner"]
    assert "solver (answer)" in page.inner_text("#graph")
    assert graph["note"] in page.inner_text("#graph-note")
    ask(page, QUESTION, temperature=0, max_tokens=4)
    assert page.eval_on_selector("#answer", "e => e.textContent") == api_answer(served, QUESTION, max_tokens=4)
    assert sorted(drawn(page, "g.node[data-lit=true]")) == sorted(system.agents)
    visit.assert_clean()


def test_with_an_api_key_the_page_asks_for_it_and_sends_it(system, open_page):
    with running(system, api_key=KEY) as served:
        visit = open_page(served.url)
        page = visit.page
        page.wait_for_selector("#error:not([hidden])")
        assert "API key" in page.inner_text("#error")
        page.fill("#api-key", KEY)
        page.press("#api-key", "Tab")  # the key is taken when the field changes
        page.wait_for_selector("#graph svg g.node")
        assert page.is_hidden("#error")
        assert page.evaluate("sessionStorage.getItem('latentgraph.apiKey')") == KEY
        ask(page, QUESTION, temperature=0, max_tokens=4)
        assert page.eval_on_selector("#answer", "e => e.textContent") == api_answer(served.url, QUESTION, key=KEY,
                                                                                    max_tokens=4)
        visit.errors = [e for e in visit.errors if "401" not in e]  # the browser logs the first, keyless call
        visit.assert_clean()


def test_a_bad_setting_shows_the_servers_message(served, open_page):
    visit = open_page(served)
    page = visit.page
    page.wait_for_selector("#graph svg g.node")
    ask(page, QUESTION, temperature=5, max_tokens=4)
    assert page.get_attribute("#answer", "data-state") == "error"
    expected = chat(served, QUESTION, temperature=5, max_tokens=4).json()["error"]["message"]
    assert "'temperature' must be between 0 and 2" in expected
    assert page.inner_text("#error") == expected
    visit.errors = [e for e in visit.errors if "400" not in e]  # the browser logs the failed request
    visit.assert_clean()


def test_an_error_in_the_middle_of_the_stream_is_shown_with_the_answer_so_far(served, open_page):
    visit = open_page(served)
    page = visit.page
    page.wait_for_selector("#graph svg g.node")
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    error = {"error": {"message": "the system failed on this batch: out of memory", "type": "server_error"}}
    body = "".join(f"data: {json.dumps(payload)}\n\n" for payload in (chunk, error))
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    ask(page, QUESTION)
    assert page.get_attribute("#answer", "data-state") == "error"
    assert page.eval_on_selector("#answer", "e => e.textContent") == "Hel"
    assert page.inner_text("#error") == error["error"]["message"]
    visit.assert_clean()
