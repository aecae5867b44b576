"""render(): the DOT text of a system, and files written from it."""

import shutil

import pytest

import latentgraph as lg

EXPECTED = r'''digraph latentgraph {
	graph [rankdir=LR]
	node [fontname=Helvetica shape=box style=rounded]
	edge [fontname=Helvetica fontsize=10]
	planner [label="planner\nQwen3ForCausalLM\nhidden 64, 3 latent steps"]
	critic [label="critic\nLlamaForCausalLM\nhidden 48, 4 latent steps"]
	solver [label="solver (answer)\nQwen3ForCausalLM\nhidden 64, 2 latent steps" peripheries=2]
	planner -> critic [label="ln_res 64→48\n14.2K params"]
	critic -> solver [label=text color=gray40 fontcolor=gray40]
	solver -> planner [label="linear 64→64\n4.2K params\nslot feedback" constraint=false style=dashed]
}
'''


@pytest.fixture
def system(tiny):
    qwen, qwen_tok = tiny("qwen3", 64)
    llama, llama_tok = tiny("llama", 48)
    planner = lg.Agent("planner", qwen, tokenizer=qwen_tok, latent_steps=3, prompt="{question}",
                       feedback_prompt="{feedback} {question}")
    critic = lg.Agent("critic", llama, tokenizer=llama_tok, latent_steps=4, prompt="{planner} {question}")
    solver = lg.Agent("solver", qwen, tokenizer=qwen_tok, latent_steps=2, prompt="{critic} {question}")
    system = lg.System([planner, critic, solver], answer="solver")
    system.connect("planner", "critic").connect("critic", "solver", mode="text")
    return system.connect("solver", "planner", slot="feedback", feedback=True, link="linear")


def test_dot_source(system):
    graph = lg.render(system)
    assert graph.source == EXPECTED
    # 14.2K is the exact parameter count of a 64 -> 48 ln_res outer link, rounded
    assert sum(p.numel() for p in system.links["planner->critic"].parameters()) == 14_240


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
@pytest.mark.parametrize("suffix, magic", [(".svg", b"<svg"), (".png", b"\x89PNG")])
def test_writes_images_when_dot_exists(system, tmp_path, suffix, magic):
    path = tmp_path / f"system{suffix}"
    lg.render(system, path=path)
    data = path.read_bytes()
    assert magic in data[:400]
    assert list(tmp_path.iterdir()) == [path]  # no stray DOT file beside it
    if suffix == ".svg":
        assert b"solver (answer)" in data and b"ln_res 64\xe2\x86\x9248" in data


def test_dot_file_needs_no_binary(system, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    lg.render(system, path=tmp_path / "system.dot")
    assert (tmp_path / "system.dot").read_text() == EXPECTED
    with pytest.raises(lg.InputError, match="needs the Graphviz 'dot' program: install it"):
        lg.render(system, path=tmp_path / "system.svg")


def test_jupyter_shows_the_dot_text_and_the_fix_without_the_dot_program(system, monkeypatch):
    monkeypatch.setenv("PATH", "")
    bundle = lg.render(system)._repr_mimebundle_()
    assert set(bundle) == {"text/plain"}
    assert bundle["text/plain"].startswith(EXPECTED) and "apt-get install graphviz" in bundle["text/plain"]


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs the Graphviz 'dot' program")
def test_jupyter_shows_svg_with_the_dot_program(system):
    assert set(lg.render(system)._repr_mimebundle_()) == {"image/svg+xml"}


def test_an_unknown_suffix_is_an_input_error_naming_the_formats(system, tmp_path):
    with pytest.raises(lg.InputError, match=r"'.exe' is not a Graphviz output format; use a path ending in .svg"):
        lg.render(system, path=tmp_path / "x.exe")
    assert list(tmp_path.iterdir()) == []


def test_to_networkx_holds_every_edge_feedback_included_with_its_attributes(system):
    graph = system.to_networkx()
    assert list(graph.nodes) == ["planner", "critic", "solver"]
    assert graph.graph == {"rounds": 3, "answer": "solver", "inner_rounds": {}}
    assert graph.nodes["critic"] == {"backbone": "LlamaForCausalLM", "revision": None, "hidden_size": 48,
                                     "latent_steps": 4, "answer": False, "tools": [], "system": None}
    assert graph.nodes["solver"]["answer"] is True
    assert graph.edges["solver", "planner"] == {
        "name": "solver->planner", "slot": "feedback", "mode": "latent", "feedback": True, "link_type": "linear",
        "in_dim": 64, "out_dim": 64, "params": 64 * 64 + 64}
    assert graph.edges["planner", "critic"] | {"params": None} == {
        "name": "planner->critic", "slot": "planner", "mode": "latent", "feedback": False, "link_type": "ln_res",
        "in_dim": 64, "out_dim": 48, "params": None}
    assert graph.edges["critic", "solver"] == {"name": "critic->solver", "slot": "critic", "mode": "text",
                                               "feedback": False, "link_type": None, "in_dim": None,
                                               "out_dim": None, "params": None}
    assert set(system.graph().forward_dag().edges) == {("planner", "critic"), ("critic", "solver")}
