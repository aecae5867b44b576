"""Training links on tiny frozen backbones: losses fall, only links change, resume is exact, logs are complete."""

import json
import os
import shutil

import pytest
import torch
from systems import save_with_backbone_dirs, sequential

import latentgraph as lg
import latentgraph.training.loop
from latentgraph.training.data import TrainExample, clean_gsm8k_solution, load_training_data
from latentgraph.training.loop import TrainConfig, batches_for, train

EXAMPLES = [
    TrainExample("What is 17 * 23?", "The answer is 391.", plan="Multiply 17 by 23."),
    TrainExample("What is 12 + 30?", "The answer is 42.", plan="Add 12 and 30.", targets={"critic": "Add them."}),
    TrainExample("Half of 48?", "The answer is 24.", plan="Divide 48 by 2."),
    TrainExample("Twice 9?", "The answer is 18.", plan="Multiply 9 by 2."),
]


@pytest.fixture
def sharp(tiny):
    """Tiny backbones with larger initial weights, whose predictions depend more on their inputs: with the
    default small init a random model predicts nearly uniformly, whatever the links send."""
    return lambda arch, size, seed=0: tiny(arch, size, seed=seed, init_std=0.2)


@pytest.fixture
def system(sharp):
    system = sequential(sharp, steps=(2, 3, 2))
    system.rounds = 2
    return system


def backbone_state(system):
    return {f"{name}.{k}": v.clone() for name, agent in system.agents.items()
            for k, v in agent.model.state_dict().items()}


@pytest.mark.parametrize("stage, regime", [("inner", "rollout"), ("outer", "teacher"), ("outer", "rollout"),
                                           ("joint", "rollout")])
def test_loss_falls_on_a_fixed_batch_and_only_links_change(system, stage, regime):
    before = backbone_state(system)
    links_before = {k: v.clone() for k, v in system.state_dict().items()}
    config = TrainConfig(stage=stage, regime=regime, steps=20, batch_size=2, lr=1e-2, warmup=0)
    log = train(system, EXAMPLES[:2], config, progress=False)  # two examples: every step sees the same batch
    losses = [r["loss"] for r in log]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.1, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 17, losses  # it falls step after step
    after = backbone_state(system)
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen backbones, bit for bit
    assert all(agent.model.training is False for agent in system.agents.values())
    changed = {k for k, v in system.state_dict().items() if not torch.equal(v, links_before[k])}
    inner = {k for k in changed if not k.startswith("links.")}
    outer = changed - inner
    assert bool(inner) == (stage in ("inner", "joint")) and bool(outer) == (stage in ("outer", "joint"))


def test_backbones_receive_no_gradients(system):
    from latentgraph.training.objectives import unrolled_loss

    unrolled = unrolled_loss(system, EXAMPLES[:2], regime="rollout")
    unrolled.loss.backward()
    assert all(p.grad is None for agent in system.agents.values() for p in agent.model.parameters())
    assert all(p.grad is not None for p in system.links.parameters())


def test_gradient_norm_log_has_an_entry_per_round_and_link(system):
    log = train(system, EXAMPLES, TrainConfig(stage="outer", steps=2, rounds=3), progress=False)
    record = log[-1]
    assert set(record["links"]) == {"planner", "critic", "solver", "planner->critic", "critic->solver",
                                    "solver->planner"}
    assert record["links"]["planner"] == 0.0 and record["links"]["planner->critic"] > 0  # inner links frozen
    expected = {"planner", "planner->critic", "critic", "critic->solver"}
    assert set(record["rounds"]) == {"1", "2", "3"}
    assert set(record["rounds"]["1"]) == set(record["rounds"]["2"]) == expected | {"solver", "solver->planner"}
    assert set(record["rounds"]["3"]) == expected  # no feedback from the last round
    assert record["rounds"]["3"]["critic->solver"] > 0 and record["rounds"]["1"]["solver->planner"] > 0


def test_resume_gives_the_same_links_as_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    config = TrainConfig(stage="joint", regime="rollout", steps=6, batch_size=1, accumulate=2, lr=1e-3, warmup=2,
                         save_every=3)
    whole = sequential(tiny, steps=(2, 2, 2))
    whole.rounds = 2
    initial = {k: v.clone() for k, v in whole.state_dict().items()}
    train(whole, EXAMPLES, config, output=tmp_path / "whole", progress=False)

    interrupted = sequential(tiny, steps=(2, 2, 2))  # the same backbones and starting links, killed in step 5
    interrupted.rounds = 2
    interrupted.load_state_dict(initial)
    real_step = latentgraph.training.loop._step

    def dies_in_step_5(system, examples, config, step, *args):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(system, examples, config, step, *args)

    monkeypatch.setattr(latentgraph.training.loop, "_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, EXAMPLES, config, output=tmp_path / "interrupted", progress=False)
    monkeypatch.setattr(latentgraph.training.loop, "_step", real_step)
    assert sorted(p.name for p in (tmp_path / "interrupted").iterdir()) == ["checkpoint-3"]
    resumed = sequential(tiny, steps=(2, 2, 2))
    resumed.rounds = 2
    log = train(resumed, EXAMPLES, config, output=tmp_path / "resumed",
                resume=tmp_path / "interrupted" / "checkpoint-3", progress=False)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "whole" / "checkpoint-6" / "trainer_state.pt").exists()
    reloaded = lg.System.from_pretrained(tmp_path / "whole", backbones={
        name: (agent.model, agent.tokenizer) for name, agent in whole.agents.items()})
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), reloaded.state_dict().values()))


def test_data_order_is_a_function_of_seed_and_step():
    config = TrainConfig(batch_size=3, accumulate=2, seed=5)
    first = [batches_for(step, config, 10) for step in range(5)]
    assert first == [batches_for(step, config, 10) for step in range(5)]
    flat = [i for step in first[:5] for micro in step for i in micro]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs cover all
    assert first != [batches_for(step, config.model_copy(update={"seed": 6}), 10) for step in range(5)]


def test_gsm8k_adapter(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nTotal 48+24 = <<48+24=72>>72.\n#### 72"
    path.write_text(json.dumps({"question": "Natalia sold 48 clips...", "answer": solution})
                    + "\n" + json.dumps({"question": "q2", "answer": "x\n#### 1,000"}) + "\n")
    examples = load_training_data(path, format="gsm8k")
    assert examples[0] == TrainExample("Natalia sold 48 clips...", "The answer is 72.",
                                       plan="Natalia sold 48/2 = 24 clips in May.\nTotal 48+24 = 72.")
    assert examples[1].answer == "The answer is 1000." and examples[1].target_for("critic") == "x"
    assert clean_gsm8k_solution("a <<1+1=2>>2 b\n#### 2") == "a 2 b"
    with pytest.raises(lg.InputError, match="line 1: cannot read a training example"):
        (tmp_path / "bad.jsonl").write_text('{"q": 1}\n')
        load_training_data(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"question": [[1]], "answer": "x"}', "its question is \\[\\[1\\]\\]"),
    ('{"question": "q", "answer": 5, "targets": {"critic": null}}',
     "its answer is 5; its targets\\['critic'\\] is None"),
    ('{"question": "q", "answer": "a", "targets": [1]}', "its targets is \\[1\\], not {agent: text}"),
    ("[" * 5000 + "]" * 5000, "its lists or mappings are nested too deeply"),
    ('{"question": "q", "answer": ' + "9" * 5000 + "}", "it holds a value that cannot be converted"),
], ids=["list question", "number answer", "targets list", "deep", "5000 digits"])
def test_a_training_row_that_is_not_text_names_its_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + line + "\n")
    with pytest.raises(lg.InputError, match=f"bad.jsonl, line 2: cannot read a training example .*{message}"):
        load_training_data(tmp_path / "bad.jsonl")


def test_train_cli_writes_a_system_that_runs(tiny, tmp_path):
    """latentgraph train on a saved tiny system, then latentgraph run --style on its output."""
    from typer.testing import CliRunner

    from latentgraph.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answer": e.answer, "plan": e.plan}) + "\n"
                            for e in EXAMPLES))
    (tmp_path / "config.json").write_text(json.dumps({"stage": "outer", "regime": "teacher", "steps": 5, "lr": 1e-3}))
    source = save_with_backbone_dirs(sequential(tiny), tmp_path)
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--output", str(tmp_path / "trained"),
                                      "--style", str(source), "--config", str(tmp_path / "config.json"),
                                      "--steps", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "trained" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # --steps overrode the config file
    run = CliRunner().invoke(app, ["run", "What is 2 + 2?", "--style", str(tmp_path / "trained"), "--greedy",
                                   "--max-new-tokens", "3", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["style"] == str(tmp_path / "trained")


# Crash safety: a checkpoint killed or failed midway is complete or absent, the output folder never loses its
# checkpoints, and resuming from the last complete checkpoint gives the uninterrupted run's links.

CRASH = TrainConfig(stage="joint", steps=4, save_every=2, lr=1e-2, warmup=1)


@pytest.fixture
def cheap(tiny, monkeypatch):
    """Training whose steps are cheap (a deterministic loss on the links, no forwards: these tests need
    optimizer and schedule state, not a real loss) and whose fsyncs are free (a kill loses no written data).
    Returns ``run(output, resume=None) -> links after the run``, each run from the same starting links."""
    from faults import no_fsync

    no_fsync(monkeypatch)

    def cheap_step(system, examples, config, step, optimizer, params, ranks):
        optimizer.zero_grad(set_to_none=True)
        weight = 1 + sum(batches_for(step, config, len(examples))[0])
        loss = weight * sum(((p - 0.01 * (i + 1)) ** 2).mean() for i, p in enumerate(params))
        loss.backward()
        optimizer.step()
        return {"step": step + 1, "loss": loss.item()}

    monkeypatch.setattr(latentgraph.training.loop, "_step", cheap_step)
    system = sequential(tiny, steps=(1, 1, 1))
    initial = {k: v.clone() for k, v in system.state_dict().items()}

    def run(output, resume=None):
        system.load_state_dict(initial)
        train(system, EXAMPLES, CRASH, output=output, resume=resume, progress=False)
        return {k: v.clone() for k, v in system.state_dict().items()}

    run.system = system
    return run


def read(folder):
    """``{path: bytes}`` of the files in ``folder`` and below, hidden temporaries aside."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def assert_complete_checkpoint(directory, step, system):
    assert sorted(p.name for p in directory.iterdir()) == ["latentgraph_config.json", "links.safetensors",
                                                           "train_log.jsonl", "trainer_state.pt"]
    assert torch.load(directory / "trainer_state.pt", weights_only=True)["step"] == step
    log = [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, step + 1))
    lg.System.from_pretrained(directory, backbones={name: (a.model, a.tokenizer)
                                                    for name, a in system.agents.items()})


def forget_the_dead(folder):
    """Delete the temporaries a killed save left in ``folder``, so that the next save performs the same
    operations as the counted one (it would delete them itself first; test_atomic checks that it does)."""
    for path in folder.glob(".*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def intercept(monkeypatch, name, body):
    """Call ``body(target, files)`` instead of the write of the folder called ``name``."""
    real = latentgraph.training.loop.write_directory
    monkeypatch.setattr(latentgraph.training.loop, "write_directory",
                        lambda target, files: body(target, files) if target.name == name else real(target, files))
    return real


GOOD = {"step": 1, "loss": 0.5, "lr": 0.01, "grad_norm": 1.0, "links": {"planner": 0.5},
        "rounds": {"1": {"planner": 0.1}}}  # a log record as training writes it


@pytest.mark.parametrize("log, message", [
    ([GOOD, [2]], "line 2: a log record is a JSON object, not \\[2\\]"),
    ([GOOD, {"step": 2}], "line 2: a log record lacks \\['loss'\\]"),
    ([GOOD, {"step": 2, "loss": 0.5, "note": "hi"}], "line 2: a log record has no key note"),
    ([{**GOOD, "loss": "low", "links": {"planner": None}}, {"step": 2, "loss": 0.5}],
     "line 1: a log record holds numbers \\(an integer step\\), but its loss is 'low'; its links is {'planner': None}"),
    ([{**GOOD, "step": True}, {"step": 2, "loss": 0.5}], "line 1: .* but its step is True"),
    ([{**GOOD, "rounds": {"1": [0.1]}}, {"step": 2, "loss": 0.5}], "line 1: .* but its rounds is {'1': \\[0.1\\]}"),
    ([{"step": 2, "loss": 0.5}, GOOD], "line 1: the record of step 1 belongs here, not one of step 2"),
    ([GOOD], "holds 1 steps, but its checkpoint is at step 2"),
    ([GOOD, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5}], "holds 3 steps, but its checkpoint is at step 2"),
    ([GOOD, "[" * 5000 + "]" * 5000], "line 2: not JSON Python can read: its lists or mappings are nested too deeply"),
    ([GOOD, '{"step": 2, "loss": ' + "9" * 5000 + "}"], "line 2: not JSON Python can read: it holds a value that"),
], ids=["not an object", "no loss", "unknown key", "not numbers", "bool step", "bad rounds", "out of order",
        "too short", "too long", "deep", "5000 digits"])
def test_resume_refuses_a_checkpoint_log_with_a_line_training_did_not_write(cheap, tmp_path, log, message):
    initial = {k: v.clone() for k, v in cheap.system.state_dict().items()}
    cheap(tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoint-2"
    lines = [line if isinstance(line, str) else json.dumps(line) for line in log]
    (checkpoint / "train_log.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(lg.CheckpointError, match=f"train_log.jsonl.*{message}.*resume from another checkpoint"):
        cheap(tmp_path / "resumed", resume=checkpoint)
    assert not (tmp_path / "resumed").exists()  # nothing trained, nothing written
    assert all(torch.equal(v, initial[k]) for k, v in cheap.system.state_dict().items())  # no link loaded either


def test_the_resumed_log_continues_the_checkpoint_log(cheap, tmp_path):
    cheap(tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoint-2"
    kept = [GOOD, {"step": 2, "loss": 0.25, "lr": 0.02, "grad_norm": 3, "links": {}}]
    (checkpoint / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    cheap(tmp_path / "resumed", resume=checkpoint)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert log[:2] == kept and [r["step"] for r in log] == [1, 2, 3, 4]


@pytest.mark.parametrize("seed, message", [
    ("x", "Input should be a valid integer"), ("3", "Input should be a valid integer"),
    (True, "Input should be a valid integer"), (-1, "Input should be greater than or equal to 0"),
    (2**64, "Input should be less than or equal to 18446744073709551615"),
])
def test_a_seed_that_is_no_seed_is_an_input_error(seed, message):
    with pytest.raises(lg.InputError, match=f"invalid TrainConfig: seed: {message}"):
        TrainConfig(seed=seed)
    assert TrainConfig(seed=2**64 - 1).seed == 2**64 - 1


def test_a_checkpoint_failing_at_any_file_operation_is_absent_and_resume_works(cheap, tmp_path, monkeypatch):
    from faults import count, fail, hidden, injected

    whole = cheap(tmp_path / "whole")
    output, outcomes = tmp_path / "out", []

    def checkpoint_4(target, files):  # fail checkpoint-4's write at each operation; the last failure stops the run
        names = count(lambda: write(tmp_path / "probe" / "checkpoint-4", files))
        for k in range(1, len(names) + 1):
            try:
                with injected(k, fail()):
                    write(target, files)
            except lg.CheckpointError:
                assert not target.exists(), (k, names[k - 1])
                outcomes.append("absent")
            else:
                assert_complete_checkpoint(target, 4, cheap.system)
                shutil.rmtree(target)
                outcomes.append("complete")
            assert hidden(output) == [], (k, names[k - 1])
        with injected(names.index("rename") + 1, fail()):
            write(target, files)

    write = intercept(monkeypatch, "checkpoint-4", checkpoint_4)
    with pytest.raises(lg.CheckpointError, match="disk is full"):
        cheap(output)
    assert "absent" in outcomes and outcomes[-1] == "complete", outcomes
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2"]
    assert_complete_checkpoint(output / "checkpoint-2", 2, cheap.system)
    monkeypatch.setattr(latentgraph.training.loop, "write_directory", write)
    resumed = cheap(tmp_path / "resumed", resume=output / "checkpoint-2")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills are simulated in forked children")
def test_a_checkpoint_killed_at_any_file_operation_is_complete_or_absent_and_resume_works(cheap, tmp_path,
                                                                                          monkeypatch):
    from faults import KILLED, count, hidden, killed_at

    whole = cheap(tmp_path / "whole")
    output, outcomes = tmp_path / "out", []

    def checkpoint_4(target, files):  # kill checkpoint-4's write at each operation, then the trainer itself
        names = count(lambda: write(tmp_path / "probe" / "checkpoint-4", files))
        for k in range(1, len(names) + 1):
            if target.exists():
                shutil.rmtree(target)
            forget_the_dead(output)
            assert killed_at(k, lambda: write(target, files)) == KILLED
            if target.exists():
                assert read(target) == files, (k, names[k - 1])
            outcomes.append("complete" if target.exists() else "absent")
        raise KeyboardInterrupt

    write = intercept(monkeypatch, "checkpoint-4", checkpoint_4)
    with pytest.raises(KeyboardInterrupt):
        cheap(output)
    assert outcomes[0] == "absent" and outcomes[-1] == "complete", outcomes
    assert_complete_checkpoint(output / "checkpoint-2", 2, cheap.system)
    assert_complete_checkpoint(output / "checkpoint-4", 4, cheap.system)
    monkeypatch.setattr(latentgraph.training.loop, "write_directory", write)
    resumed = cheap(output, resume=output / "checkpoint-4")  # the last complete one
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert hidden(output) == []  # the resumed run's saves deleted what the killed ones left


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills are simulated in forked children")
def test_the_final_save_killed_at_any_file_operation_keeps_every_checkpoint(cheap, tmp_path, monkeypatch):
    from faults import KILLED, count, hidden, killed_at

    output, outcomes = tmp_path / "out", []

    def final(target, files):  # kill the final save into the output at each operation
        probe = tmp_path / "probe"
        shutil.copytree(target, probe)
        names = count(lambda: write(probe, files))
        old = read(target)  # the two checkpoints, complete
        for k in range(1, len(names) + 1):
            forget_the_dead(tmp_path)
            assert killed_at(k, lambda: write(target, files)) == KILLED
            seen = read(target)  # the checkpoints, and the final files all or none:
            assert seen in (old, {**old, **files}), (k, names[k - 1])
            outcomes.append("old" if seen == old else "new")
        return write(target, files)

    write = intercept(monkeypatch, "out", final)
    cheap(output)
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2", "checkpoint-4", "latentgraph_config.json",
                                                        "links.safetensors", "train_log.jsonl"]
    assert hidden(output) == [] and hidden(tmp_path) == []
    loaded = lg.System.from_pretrained(output, backbones={name: (a.model, a.tokenizer)
                                                          for name, a in cheap.system.agents.items()})
    assert all(torch.equal(v, cheap.system.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills are simulated in forked children")
def test_resume_puts_back_an_output_that_a_fallback_final_save_left_aside(cheap, tmp_path, monkeypatch):
    """Without the atomic exchange the final save renames the output, checkpoints and all, aside before
    renaming the new one in. Killed at any step, resuming from its last checkpoint finds it (put back first
    where it was aside) and gives the uninterrupted run's links."""
    from faults import KILLED, count, killed_at

    from latentgraph.files import atomic

    monkeypatch.setattr(atomic, "_renameat2", None)
    whole = cheap(tmp_path / "whole")
    killed = []

    def final(target, files):  # kill the final save at each operation, each time into a copy of the output
        names = count(lambda: write(shutil.copytree(target, tmp_path / "probe"), files))
        for k in range(1, len(names) + 1):
            copy = shutil.copytree(target, tmp_path / f"k{k}" / "out")
            assert killed_at(k, lambda copy=copy: write(copy, files)) == KILLED
            killed.append(copy)
        return write(target, files)

    write = intercept(monkeypatch, "out", final)
    cheap(tmp_path / "out")
    monkeypatch.setattr(latentgraph.training.loop, "write_directory", write)
    assert any(not copy.exists() for copy in killed)  # some kill came between the two renames
    for copy in killed:
        resumed = cheap(copy.parent / "resumed", resume=copy / "checkpoint-4")
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), copy
        assert sorted(p.name for p in copy.iterdir())[:2] == ["checkpoint-2", "checkpoint-4"]
