"""Data-parallel training under torchrun: 2 ranks of batch b train as one process with batch 2b, only rank 0
writes, resume continues the run exactly, and a failure on rank 0 stops every rank.

Each torchrun job runs 2 CPU ranks (gloo, loopback only) on a tiny system saved to a temporary folder."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from systems import save_with_backbone_dirs, sequential
from test_train import EXAMPLES

import latentgraph as lg
from latentgraph.training.data import load_training_data
from latentgraph.training.loop import TrainConfig, batches_for, train

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
# The default stage and regime (outer links, rollouts) through a feedback edge, with accumulation, so a step
# holds RANKS * batch_size * accumulate = 4 examples: one epoch, in its own order each step.
CONFIG = {"steps": 4, "batch_size": 1, "accumulate": 2, "lr": 1e-2, "warmup": 1, "save_every": 2}
CHECKPOINT_FILES = ["latentgraph_config.json", "links.safetensors", "train_log.jsonl", "trainer_state.pt"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 ARGS`` on a free loopback port, its ranks importing this checkout; past the
    timeout the launcher and its ranks (one process group) are killed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "--master-addr",
               "127.0.0.1", "--master-port", str(port), *args]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as launcher:
        try:
            stdout, stderr = launcher.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
            raise
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def assert_same_logs(log, expected):
    """Step by step: the same loss, learning rate and gradient norms (of the links and of each round's
    messages), up to floating-point reordering."""
    assert [r["step"] for r in log] == [r["step"] for r in expected]
    for record, reference in zip(log, expected):
        assert record["lr"] == reference["lr"]
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
        assert record["links"] == pytest.approx(reference["links"], rel=1e-4, abs=1e-7)
        assert record["rounds"].keys() == reference["rounds"].keys()
        for r in record["rounds"]:
            assert record["rounds"][r] == pytest.approx(reference["rounds"][r], rel=1e-4, abs=1e-7)


def assert_same_links(folder: Path, expected: dict[str, torch.Tensor], atol: float = 1e-4):
    links = load_file(folder / "links.safetensors")
    assert links.keys() == expected.keys()
    for name, tensor in links.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def job(tiny, tmp_path_factory):
    """A tiny saved system and its data, trained by ``torchrun -m latentgraph train`` on 2 ranks."""
    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    system = sequential(lambda arch, size, seed=0: tiny(arch, size, seed=seed, init_std=0.2), steps=(2, 2, 2))
    system.rounds = 2
    source = save_with_backbone_dirs(system, folder)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answer": e.answer, "plan": e.plan,
                                        "targets": e.targets}) + "\n" for e in EXAMPLES))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    run = torchrun("-m", "latentgraph", "train", "--data", str(data), "--output", str(folder / "out"),
                   "--style", str(source), "--config", str(folder / "config.json"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr.count("trained outer links up to step 4 on 4 examples") == 1  # rank 0 reports for both
    return folder, source, data, run


@pytest.mark.slow
def test_two_ranks_make_the_updates_of_one_process_with_twice_the_batch(job, tmp_path):
    folder, source, data, _ = job
    system = lg.load(source)
    config = TrainConfig(**{**CONFIG, "batch_size": RANKS * CONFIG["batch_size"], "save_every": None})
    log = train(system, load_training_data(data), config, progress=False)
    system.save_pretrained(tmp_path / "one-process")
    assert_same_logs(read_log(folder / "out"), log)
    # Adam divides each update by the root of its gradient's second moment: where a gradient is nearly zero, the
    # reordering of the all-reduced sum against the one-process sum moves the update by up to ~1% of lr (seen:
    # 1.1e-4 on one of 8192 weights at lr 1e-2), so the links agree to 2% of one step's size
    assert_same_links(folder / "out", load_file(tmp_path / "one-process" / "links.safetensors"),
                      atol=0.02 * CONFIG["lr"])
    start = load_file(source / "links.safetensors")
    moved = load_file(folder / "out" / "links.safetensors")
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-3  # not an equality of untrained links


@pytest.mark.slow
def test_only_rank_0_writes_each_checkpoint_once(job):
    folder = job[0] / "out"
    assert files_in(folder) == [f"checkpoint-{n}/{name}" for n in (2, 4) for name in CHECKPOINT_FILES] + [
        "latentgraph_config.json", "links.safetensors", "train_log.jsonl"]  # no temporaries left aside either
    assert [r["step"] for r in read_log(folder)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_log(folder / "checkpoint-2")] == [1, 2]
    assert torch.load(folder / "checkpoint-4" / "trainer_state.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
def test_lg_train_in_each_rank_returns_the_log_and_resumes_as_an_uninterrupted_run(job):
    """lg.train called twice in each rank's process: a whole run, then one resumed from its step-2 checkpoint.
    Every rank returns the whole log, only rank 0 wrote, and the resumed links are the whole run's, which are
    the CLI's."""
    folder, source, data, _ = job
    report = folder / "report"
    report.mkdir()
    run = torchrun(str(ROOT / "tests" / "train_rank.py"), str(source), str(data), str(folder / "config.json"),
                   str(folder / "api"), str(report))
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = [json.loads((report / f"rank-{r}.json").read_text()) for r in range(RANKS)]
    assert ranks[0]["whole"] == ranks[1]["whole"] and ranks[0]["resumed"] == ranks[1]["resumed"]
    api = folder / "api"
    assert ranks[0]["written"] == [str(api / "whole" / "checkpoint-2"), str(api / "whole" / "checkpoint-4"),
                                   str(api / "whole"), str(api / "resumed" / "checkpoint-4"), str(api / "resumed")]
    assert ranks[1]["written"] == []
    assert ranks[0]["resumed"][:2] == ranks[0]["whole"][:2]  # carried over from the checkpoint
    assert_same_logs(ranks[0]["resumed"], ranks[0]["whole"])
    assert_same_logs(ranks[0]["whole"], read_log(folder / "out"))
    whole = load_file(api / "whole" / "links.safetensors")
    assert_same_links(api / "resumed", whole, atol=1e-6)
    assert_same_links(folder / "out", whole, atol=1e-6)


@pytest.mark.slow
def test_a_failed_write_on_rank_0_stops_every_rank_with_its_reason(job, tmp_path):
    folder, source, data, _ = job
    (tmp_path / "taken").write_text("a file where the output folder should go")
    run = torchrun("-m", "latentgraph", "train", "--data", str(data), "--output", str(tmp_path / "taken"),
                   "--style", str(source), "--config", str(folder / "config.json"))
    assert run.returncode != 0
    reason = f"cannot write {tmp_path / 'taken' / 'checkpoint-2'}"
    assert f"error: {reason}" in run.stderr
    assert f"error: rank 0 failed, so rank 1 stops too: {reason}" in run.stderr


@pytest.mark.parametrize("batch_size, accumulate, ranks", [(1, 1, 2), (2, 3, 2), (3, 2, 4), (2, 1, 3)])
def test_the_ranks_shards_make_the_single_process_batch_in_order(batch_size, accumulate, ranks):
    config = TrainConfig(batch_size=batch_size, accumulate=accumulate, seed=3)
    whole = config.model_copy(update={"batch_size": batch_size * ranks})
    for step in range(12):  # several epochs of 10 examples, some steps straddling two
        shards = [batches_for(step, config, 10, rank, ranks) for rank in range(ranks)]
        assert all(len(micro) == batch_size for shard in shards for micro in shard)
        joined = [sum((shard[k] for shard in shards), []) for k in range(accumulate)]
        assert joined == batches_for(step, whole, 10)
    assert batches_for(0, config, 10, 0, 1) == batches_for(0, config, 10)  # one rank: the single-process order
