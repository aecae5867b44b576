"""Scaling out on this machine: evaluation on 1 and 2 Ray workers, a training step on 1 and 2 torchrun ranks.

A two-agent system (planner -> solver, solver -> planner feedback, 2 rounds) on a random ~85M-parameter
llama, saved to a temporary folder so Ray workers and torchrun ranks load it by path, runs:

- evaluation: the same questions with ``workers=1`` and ``workers=2`` (one thread each) on one local Ray
  instance, interleaved over the repeats; it prints questions per second, end to end (worker start-up and
  backbone loading included), the ratio, and whether both gave the same rows;
- training: ``torchrun --nproc-per-node 1`` and ``2``, one thread per rank, the same per-rank batch; each
  run times its steps after a warm-up step, and the script prints the step time, the examples per second
  and their ratio (2 ranks train on twice the examples per step).

    python benchmarks/scale.py                     # 32 questions, 2 repeats; 6 training steps
    python benchmarks/scale.py --questions 16 --repeats 1 --steps 3
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

WORDS = "Natalia sold clips to her friends in April and half as many in May. How many clips did she sell"


def make_system(directory: Path, latent_steps: int):
    """Save a random ~85M llama and a system on it in ``directory``; returns the system's folder."""
    import latentgraph as lg
    from latentgraph.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory / "backbone")
    tokenizer.save_pretrained(directory / "backbone")
    source = str(directory / "backbone")
    planner = lg.Agent("planner", source, prompt="Plan how to solve: {question}", latent_steps=latent_steps,
                       feedback_prompt="Feedback: {feedback}\nImprove your plan for: {question}", device="cpu")
    solver = lg.Agent("solver", source, prompt="Plan: {planner}\n{question}\nAnswer in \\boxed{{}}.",
                      latent_steps=latent_steps, device="cpu")
    system = lg.System([planner, solver], rounds=2, answer="solver")
    system.connect("planner", "solver").connect("solver", "planner", slot="feedback", feedback=True)
    system.save_pretrained(directory / "system")
    return directory / "system"


def questions(n: int):
    from latentgraph.evaluation.datasets import Example

    return [Example(f"q{i}", f"{WORDS} in week {i}?", str(i), "math") for i in range(n)]


def evaluation(folder: Path, args) -> None:
    import ray

    import latentgraph as lg

    system = lg.System.from_pretrained(folder, device="cpu")
    examples = questions(args.questions)
    settings = {"batch_size": args.batch, "max_new_tokens": args.max_new_tokens, "progress": False}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        seconds, rows = {1: [], 2: []}, {}
        for repeat in range(args.repeats):
            for workers in (1, 2) if repeat % 2 == 0 else (2, 1):  # alternate which goes first
                start = time.perf_counter()
                report = lg.evaluate(system, examples, workers=workers, threads_per_worker=1, **settings)
                seconds[workers].append(time.perf_counter() - start)
                rows[workers] = [(r["id"], r["prediction"]) for r in report.rows]
    finally:
        ray.shutdown()
    rate = {w: args.questions / statistics.median(s) for w, s in seconds.items()}
    print(f"evaluation: {args.questions} questions, batch {args.batch}, {args.max_new_tokens} new tokens, "
          f"median of {args.repeats}, end to end")
    for workers, value in rate.items():
        print(f"  {workers} Ray worker{'s' if workers > 1 else ' '} (1 thread each)  {value:6.3f} questions/s  "
              f"({statistics.median(seconds[workers]):.1f} s)")
    print(f"  2 workers / 1 worker: {rate[2] / rate[1]:.2f}x; same rows: {rows[1] == rows[2]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training(folder: Path, args) -> None:
    results = {}
    for ranks in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, "--rank-of",
                   str(folder), "--steps", str(args.steps), "--train-batch", str(args.train_batch)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            sys.exit(f"torchrun with {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
        results[ranks] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\ntraining (outer links, rollout regime, {args.steps} timed steps after 1 warm-up, batch "
          f"{args.train_batch} per rank, 1 thread per rank):")
    for ranks, r in results.items():
        print(f"  {ranks} torchrun rank{'s' if ranks > 1 else ' '}  {r['step']:6.2f} s/step  "
              f"{r['examples'] / r['step']:6.2f} examples/s")
    speed = (results[2]["examples"] / results[2]["step"]) / (results[1]["examples"] / results[1]["step"])
    print(f"  2 ranks / 1 rank: step time {results[2]['step'] / results[1]['step']:.2f}x, examples/s {speed:.2f}x")


def rank_of(folder: Path, args) -> None:
    """One rank of a torchrun job: time ``steps`` training steps after a warm-up step; rank 0 prints JSON."""
    import torch.distributed as dist

    import latentgraph as lg
    from latentgraph.training.data import TrainExample

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # train() joins it; timing then leaves out its start
    system = lg.System.from_pretrained(folder, device="cpu")
    data = [TrainExample(f"{WORDS} in week {i}?", f"The answer is {i}.", plan="Count April, then May.")
            for i in range(64)]
    lg.train(system, data, lg.TrainConfig(steps=1, batch_size=args.train_batch, warmup=0), progress=False)
    dist.barrier()
    start = time.perf_counter()
    lg.train(system, data, lg.TrainConfig(steps=args.steps, batch_size=args.train_batch, warmup=0), progress=False)
    dist.barrier()
    step = (time.perf_counter() - start) / args.steps
    if dist.get_rank() == 0:
        print(json.dumps({"step": step, "examples": args.train_batch * dist.get_world_size()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--latent-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--train-batch", type=int, default=2, help="training examples per rank and step")
    parser.add_argument("--skip", choices=["evaluation", "training"], help="leave one part out")
    parser.add_argument("--rank-of", type=Path, help=argparse.SUPPRESS)  # set when torchrun runs this file
    args = parser.parse_args()
    if args.rank_of:
        return rank_of(args.rank_of, args)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as scratch:
        folder = make_system(Path(scratch), args.latent_steps)
        if args.skip != "evaluation":
            evaluation(folder, args)
        if args.skip != "training":
            training(folder, args)


if __name__ == "__main__":
    main()
