"""Loading the published RecursiveMAS systems from a simulated hub cache (HF_HUB_OFFLINE=1)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import latentgraph as lg
from latentgraph.checkpoints.native import CONFIG_NAME, WEIGHTS_NAME
from latentgraph.checkpoints.published import list_styles, published_styles, style_module

STYLES = published_styles()
QUESTIONS = ["What is 17 * 23?", "A train travels 60 km in 45 minutes. What is its speed in km/h?"]


def short(system):
    for agent in system.agents.values():
        agent.latent_steps = 4
    return system


@pytest.mark.parametrize("style", STYLES)
def test_style_loads_validates_and_runs(published_hub, style):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    system = short(lg.load_style(style, device="cpu"))
    out = system.run(QUESTIONS, rounds=2, do_sample=False, max_new_tokens=4)
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert len(out.trace) == 2 and out.trace[1][system.answer].tokens_out is not None
    assert set(system.agents) == set(style_module(style).CHECKPOINTS) - {"links"}


@pytest.mark.parametrize("task", ["math", "code"])
@pytest.mark.parametrize("style", STYLES)
def test_every_link_tensor_equals_the_published_one(published_hub, style, task):
    system = lg.load_style(style, task=task, device="cpu")
    for role, agent in system.agents.items():
        expected = published_hub.inner[(style, role, task)]
        for key, value in agent.inner_link.state_dict().items():
            assert value.dtype == torch.float32  # links run in fp32; bf16 -> fp32 is exact
            assert torch.equal(value.to(torch.bfloat16), expected[key]), (role, key)
    for key, (src, dst) in style_module(style).LEGACY_KEYS.items():
        expected = published_hub.outer[(style, key, task)]
        for name, value in system.links[f"{src}->{dst}"].state_dict().items():
            assert torch.equal(value.to(torch.bfloat16), expected[name]), (key, name)


def test_task_picks_the_task_adapters(published_hub):
    math = lg.load_style("sequential_light", task="math", device="cpu")
    code = lg.load_style("sequential_light", task="code", device="cpu")
    weight = lambda s: s.agents["planner"].inner_link.proj1.weight  # noqa: E731
    published = {task: published_hub.inner[("sequential_light", "planner", task)]["proj1.weight"]
                 for task in ("math", "code")}
    assert torch.equal(weight(math).bfloat16(), published["math"])
    assert torch.equal(weight(code).bfloat16(), published["code"])
    assert not torch.equal(weight(math), weight(code))
    assert "```python" in code.agents["solver"].prompt and "\\boxed{{}}" in math.agents["solver"].prompt


@pytest.mark.parametrize("style", STYLES)
def test_save_and_load_in_our_format_gives_identical_greedy_output(published_hub, style, tmp_path):
    system = short(lg.load_style(style, device="cpu"))
    before = system.run(QUESTIONS, rounds=2, do_sample=False, max_new_tokens=5)
    system.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no backbone weights
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {a["backbone"]["name_or_path"] for a in saved["agents"]} <= set(style_module(style).CHECKPOINTS.values())
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 4 * system.num_parameters() + 65536
    loaded = lg.System.from_pretrained(tmp_path, device="cpu")
    after = loaded.run(QUESTIONS, rounds=2, do_sample=False, max_new_tokens=5)
    assert after.texts == before.texts
    for name, agent in loaded.agents.items():
        assert agent.prompt == system.agents[name].prompt and agent.latent_steps == 4


def test_a_swapped_backbone_gets_fresh_links_with_a_warning(published_hub, tiny):
    model, tokenizer = tiny("llama", 64)
    with pytest.warns(UserWarning, match=r"backbones replaced for \['critic'\].*start fresh"):
        system = lg.load_style("sequential_light", backbones={"critic": (model, tokenizer)}, device="cpu")
    assert system.agents["critic"].model is model
    assert system.links["planner->critic"].config.out_dim == 64  # planner 64 -> new critic 64
    planner = published_hub.inner[("sequential_light", "planner", "math")]["proj1.weight"]
    assert torch.equal(system.agents["planner"].inner_link.proj1.weight.bfloat16(), planner)
    short(system).run(QUESTIONS[:1], rounds=2, do_sample=False, max_new_tokens=2)


def test_bare_graph_without_weights(published_hub):
    system = lg.load_style("mixture", load_weights=False)
    assert list(system.links) == ["math->summarizer", "summarizer->math", "code->summarizer", "summarizer->code",
                                  "science->summarizer", "summarizer->science"]
    assert not any(agent.backbone.loaded for agent in system.agents.values())  # configs only
    assert "summarizer (answer)" in lg.render(system).source


def test_unknown_style_role_and_task(published_hub):
    with pytest.raises(lg.CheckpointError, match="unknown style 'nope'; the styles are"):
        lg.load_style("nope")
    with pytest.raises(lg.CheckpointError, match=r"checkpoints= names \['judge'\], not roles of style 'mixture'"):
        lg.load_style("mixture", checkpoints={"judge": "x"})
    with pytest.raises(lg.CheckpointError, match="task must be one of"):
        lg.load_style("mixture", task="poetry")


def test_a_repo_that_is_not_cached_names_itself_and_the_fix(published_hub):
    with pytest.raises(lg.CheckpointError, match=r"hub repo 'RecursiveMAS/Nope' is neither cached nor reachable "
                                                 r"\(HF_HUB_OFFLINE is set\).*hf download RecursiveMAS/Nope"):
        lg.load_style("distillation", checkpoints={"learner": "RecursiveMAS/Nope"})


@pytest.fixture
def links_copy(published_hub, tmp_path):
    """A writable copy of the sequential_light outer-link repo, to corrupt."""
    source = Path(os.environ["HF_HUB_CACHE"]) / "models--RecursiveMAS--Sequential-Light-Outerlinks" / "snapshots"
    directory = tmp_path / "links"
    shutil.copytree(next(source.iterdir()), directory, symlinks=False)
    return directory


def test_missing_edge_file(links_copy):
    (links_copy / "Critic-Solver-Outerlink.pt").unlink()
    with pytest.raises(lg.CheckpointError, match="Critic-Solver-Outerlink.pt is missing"):
        lg.load_style("sequential_light", checkpoints={"links": str(links_copy)})


def test_wrong_shape_names_the_file_and_tensor(links_copy):
    path = links_copy / "Planner-Critic-Outerlink.pt"
    state = torch.load(path, weights_only=True)
    state["proj2.weight"] = state["proj2.weight"][:, :-1]
    torch.save(state, path)
    with pytest.raises(lg.CheckpointError, match=r"Planner-Critic-Outerlink.pt: tensor 'proj2.weight' has shape "
                                                 r"\(48, 95\), the link expects \(48, 96\)"):
        lg.load_style("sequential_light", checkpoints={"links": str(links_copy)})


def test_manifest_with_an_unknown_legacy_key(links_copy):
    manifest = links_copy / "outerlink_config.json"
    data = json.loads(manifest.read_text())
    data["tasks"]["math"]["adapters"][0]["legacy_key"] = "outer_99"
    manifest.write_text(json.dumps(data))
    with pytest.raises(lg.CheckpointError, match=r"outerlink_config.json names outer link 'outer_99', which style "
                                                 r"'sequential_light' does not have"):
        lg.load_style("sequential_light", checkpoints={"links": str(links_copy)})


class Exploit:
    """Unpickling this would run a shell command; weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_holding_code_is_refused_not_executed(links_copy, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"proj1.weight": Exploit(marker)}, links_copy / "Solver-Planner-Outerlink.pt")
    with pytest.raises(lg.CheckpointError, match="Solver-Planner-Outerlink.pt is not a plain state dict of tensors: "
                                                 "refused to unpickle it: it holds the global posix.system"):
        lg.load_style("sequential_light", checkpoints={"links": str(links_copy)})
    assert not marker.exists()


def test_a_pickle_of_a_non_dict_is_refused(links_copy):
    torch.save([torch.zeros(2)], links_copy / "Solver-Planner-Outerlink.pt")
    with pytest.raises(lg.CheckpointError, match="holds a list, not a dict of named tensors"):
        lg.load_style("sequential_light", checkpoints={"links": str(links_copy)})


def test_convert_cli_writes_our_format_without_pickles(published_hub, tmp_path):
    from typer.testing import CliRunner

    from latentgraph.cli import app

    result = CliRunner().invoke(app, ["convert", "distillation", str(tmp_path / "out"), "--task", "code"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    converted = lg.System.from_pretrained(tmp_path / "out", device="cpu")
    assert converted.agents["expert"].backbone.name_or_path == "RecursiveMAS/Distillation-Expert-Qwen3.5-9B"
    original = lg.load_style("distillation", task="code", device="cpu")
    for (name, x), (_, y) in zip(original.state_dict().items(), converted.state_dict().items()):
        assert torch.equal(x, y), name


def test_styles_cli_lists_every_style():
    from typer.testing import CliRunner

    from latentgraph.cli import app

    lines = CliRunner().invoke(app, ["styles"]).output.splitlines()
    assert [line.split()[0] for line in lines] == list_styles() == [*STYLES, "latent_mas"]


def test_the_model_cards_snippet_runs_as_written(published_hub):
    carded = lg.load_style("distillation", device="cpu", trust_remote_code=True)  # no remote code runs either way
    plain = lg.load_style("distillation", device="cpu")
    assert carded.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(carded.state_dict()[k], v) for k, v in plain.state_dict().items())
