"""Device maps: backbones spread by accelerate, here offloaded to disk on a CPU, give what a plain load gives."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

import latentgraph as lg
from latentgraph.cli import app
from latentgraph.errors import InputError

# Every module of the tiny llama named, two of them offloaded to disk (their weights stay on meta until used).
LLAMA_ON_DISK = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}
PROMPTS = {"planner": ("Plan how to solve: {question}", "Feedback: {feedback}\nImprove your plan for: {question}"),
           "solver": ("Plan: {planner}\n{question}\nAnswer in \\boxed{{}}.", None)}


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory):
    """A tiny llama and a tiny qwen2, each saved to a directory as a checkpoint on disk would be."""
    from latentgraph.testing import tiny_backbone

    dirs = {}
    for name, arch, size in (("llama", "llama", 64), ("qwen2", "qwen2", 48)):
        model, tokenizer = tiny_backbone(arch, size, seed=len(dirs))
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def pair(dirs, placements):
    """planner (llama) -> solver (qwen2), with solver -> planner feedback; ``placements``: per agent, the
    placement options of its backbone."""
    agents = [lg.Agent(name, dirs[source], prompt, feedback_prompt=feedback, latent_steps=3, **placements[name])
              for (name, (prompt, feedback)), source in zip(PROMPTS.items(), ("llama", "qwen2"))]
    system = lg.System(agents, rounds=2, answer="solver")
    system.connect("planner", "solver").connect("solver", "planner", slot="feedback", feedback=True)
    return system


def test_disk_offload_gives_the_texts_and_latents_of_a_plain_cpu_load(backbone_dirs, tmp_path):
    plain = pair(backbone_dirs, {"planner": {"device": "cpu"}, "solver": {"device": "cpu"}})
    spread = pair(backbone_dirs, {
        "planner": {"device_map": LLAMA_ON_DISK, "offload_folder": tmp_path / "offload"},
        "solver": {"device_map": "auto", "max_memory": {"cpu": 20_000}},  # too little: all of it goes to disk
    })
    spread.load_state_dict(plain.state_dict())  # the same link weights
    planner = spread.agents["planner"].backbone
    assert planner.model.get_input_embeddings().weight.device.type == "meta"  # really offloaded
    assert planner.device == torch.device("cpu") and planner.devices == {torch.device("cpu")}
    assert spread.agents["solver"].model.hf_device_map == {"": "disk"}
    questions = ["What is 17 * 23?", "Why?"]
    expected = plain.run(questions, do_sample=False, max_new_tokens=6, return_latents=True)
    got = spread.run(questions, do_sample=False, max_new_tokens=6, return_latents=True)
    assert got.texts == expected.texts and got.texts[0]
    assert [list(r) for r in got.latents] == [list(r) for r in expected.latents] == [["planner", "solver"],
                                                                                      ["planner"]]
    for round_got, round_expected in zip(got.latents, expected.latents):
        for name in round_got:
            torch.testing.assert_close(round_got[name], round_expected[name])
    assert all(p.device.type == "cpu" for p in spread.parameters())  # links beside the embeddings
    sampled = [s.run(questions, max_new_tokens=4, seed=3).texts for s in (plain, spread)]
    assert sampled[0] == sampled[1]


def test_closed_form_fitting_reads_offloaded_weights_as_a_plain_load_does(backbone_dirs, tmp_path):
    from latentgraph.training.closed_form import initialize

    plain = pair(backbone_dirs, {"planner": {"device": "cpu"}, "solver": {"device": "cpu"}})
    spread = pair(backbone_dirs, {"planner": {"device_map": LLAMA_ON_DISK, "offload_folder": tmp_path / "offload"},
                                  "solver": {"device_map": "auto", "max_memory": {"cpu": 20_000}}})
    spread.load_state_dict(plain.state_dict())  # fitting leaves some parameters as they were: start equal
    before = {name: p.clone() for name, p in plain.state_dict().items()}
    texts = ["What is 17 * 23? Natalia sold clips to 48 of her friends in April, and then half as many in May.",
             "The critic reviews the plan; the solver answers in \\boxed{391}. Put the final answer in a box."]
    initialize(plain, texts)
    initialize(spread, texts)
    assert spread.agents["planner"].model.get_output_embeddings().weight.device.type == "meta"  # still offloaded
    fitted = plain.state_dict()
    assert any(not torch.equal(before[name], fitted[name]) for name in fitted)
    for name, value in spread.state_dict().items():
        torch.testing.assert_close(value, fitted[name], msg=name)


def test_a_single_agent_run_loads_no_other_device_mapped_backbone(backbone_dirs, tmp_path):
    system = pair(backbone_dirs, {"planner": {"device_map": LLAMA_ON_DISK, "offload_folder": tmp_path / "offload"},
                                  "solver": {"device": "cpu"}})
    out = system.run("What is 17 * 23?", mode="single", do_sample=False, max_new_tokens=3)
    assert [list(steps) for steps in out.trace] == [["solver"]]
    assert not system.agents["planner"].backbone.loaded and system.agents["solver"].backbone.loaded


def test_placement_is_runtime_only_and_part_of_sharing_a_backbone(backbone_dirs, tmp_path):
    auto = {"device_map": "auto", "max_memory": {"cpu": "1GiB"}}
    first, second = (lg.Agent(name, backbone_dirs["llama"], **auto) for name in ("a", "b"))
    assert first.backbone is second.backbone  # one load for the same source and placement
    other = lg.Agent("c", backbone_dirs["llama"], device_map="auto", max_memory={"cpu": "2GiB"})
    plain = lg.Agent("d", backbone_dirs["llama"], device="cpu")
    assert len({id(first.backbone), id(other.backbone), id(plain.backbone)}) == 3
    assert "device_map='auto'" in repr(first.backbone) and not first.backbone.loaded
    system = lg.System([first, lg.Agent("e", backbone_dirs["qwen2"], "{question} {a}")], answer="e")
    system.connect("a", "e")
    config = json.loads((system.save_pretrained(tmp_path / "saved") / "latentgraph_config.json").read_text())
    assert "device_map" not in json.dumps(config) and "max_memory" not in json.dumps(config)
    loaded = lg.System.from_pretrained(tmp_path / "saved", **auto)
    assert loaded.agents["a"].backbone is first.backbone and not first.backbone.loaded


@pytest.mark.parametrize(("options", "fix"), [
    ({"device": "cpu", "device_map": "auto"}, "not both"),
    ({"device_map": "cuda:0"}, "pass device='cuda:0'"),
    ({"device_map": {"model.layers.0": "cuda:5"}}, "device_map['model.layers.0']"),
    ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "'20GiB'"),
    ({"device_map": "auto", "max_memory": "20GiB"}, "{0: '20GiB', 'cpu': '60GiB'}"),
    ({"device_map": "auto", "max_memory": {"gpu": "1GiB"}}, "not a GPU index"),
    ({"max_memory": {"cpu": "1GiB"}}, "add device_map='auto'"),
    ({"offload_folder": "/tmp/x"}, "add device_map='auto'"),
])
def test_placement_mistakes_are_input_errors_with_the_fix(backbone_dirs, options, fix):
    with pytest.raises(InputError, match="agent 'a'") as caught:
        lg.Agent("a", backbone_dirs["llama"], **options)
    assert fix in str(caught.value)


def test_a_device_map_needs_accelerate_and_modules_the_backbone_has(backbone_dirs, tiny, monkeypatch):
    agent = lg.Agent("a", backbone_dirs["llama"], device_map={"model.nowhere": "cpu"})
    with pytest.raises(InputError, match=r"names \['model.nowhere'\].*'model', 'lm_head'"):
        agent.backbone.load()
    with pytest.raises(InputError, match="given loaded"):
        lg.Agent("b", tiny("llama", 32)[0], tokenizer=tiny("llama", 32)[1], device_map="auto")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if it were not installed
    with pytest.raises(InputError, match="pip install accelerate"):
        lg.Agent("c", backbone_dirs["llama"], device_map="auto")


def test_cli_run_and_eval_take_a_device_map(saved, monkeypatch, tmp_path):
    result = CliRunner().invoke(app, ["run", "What is 2 + 2?", "--style", str(saved), "--json", "--greedy",
                                      "--max-new-tokens", "3", "--rounds", "1", "--device-map", "auto",
                                      "--max-memory", "cpu=20000", "--offload-folder", str(tmp_path / "off")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["answer"] == json.loads(CliRunner().invoke(
        app, ["run", "What is 2 + 2?", "--style", str(saved), "--json", "--greedy", "--max-new-tokens", "3",
              "--rounds", "1"]).stdout)["answer"]
    from latentgraph import cli

    loads = []
    monkeypatch.setattr(cli, "load", lambda style, **kwargs: loads.append(kwargs) or lg.load(style, **kwargs))
    monkeypatch.setattr("latentgraph.evaluation.runner.evaluate", lambda *a, **k: (_ for _ in ()).throw(
        InputError("stop here")))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "It is 2.\n#### 2"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--dataset", str(data), "--format", "gsm8k", "--output",
                                      str(tmp_path / "out"), "--style", str(saved), "--device-map",
                                      '{"": "cpu"}', "--max-memory", "cpu=1GiB"])
    assert isinstance(result.exception, InputError) and "stop here" in str(result.exception)
    assert loads[0]["device_map"] == {"": "cpu"} and loads[0]["max_memory"] == {"cpu": "1GiB"}


@pytest.mark.parametrize(("flags", "fix"), [
    (["--device-map", "{nope"], "--device-map is not valid JSON"),
    (["--device-map", "auto", "--max-memory", "cpu:20GiB"], "device=size pairs"),
    (["--device", "cpu", "--device-map", "auto"], "not both"),
])
def test_cli_placement_mistakes_are_one_error_line(saved, flags, fix):
    result = CliRunner().invoke(app, ["run", "Hi?", "--style", str(saved), *flags])
    assert isinstance(result.exception, InputError) and fix in str(result.exception)


def test_published_styles_and_saved_folders_load_with_a_device_map(published_hub, saved, tmp_path):
    spread = {"device_map": "auto", "max_memory": {"cpu": 20_000}, "offload_folder": tmp_path}
    for name in ("sequential_light", str(saved)):
        plain, offloaded = lg.load(name, device="cpu"), lg.load(name, **spread)
        assert all(a.backbone.device_map is not None for a in offloaded.agents.values())
        settings = {"do_sample": False, "max_new_tokens": 3, "rounds": 1}
        assert offloaded.run("What is 2 + 2?", **settings).texts == plain.run("What is 2 + 2?", **settings).texts
