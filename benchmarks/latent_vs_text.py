"""Latent against text communication on the same graph, with real models: time and generated tokens.

The embedded default system (SmolLM2-135M-Instruct and Gemma 3 270M) answers held-out GSM8K problems in
latent mode (agents exchange thoughts through their links; only the answer node writes) and in text mode
(the same graph with every edge a text edge: each agent writes its message). For r = 1, 2, 3 rounds it
prints wall time, generated tokens and strict accuracy per mode, the text/latent time ratio and the token
reduction, next to the paper's figures for RecursiveMAS against Recursive-TextMAS (1.2x / 1.9x / 2.4x
faster, 34.6% / 65.5% / 75.6% fewer tokens, averaged over its benchmarks and models).

    python benchmarks/latent_vs_text.py                       # 20 problems, rows 7000-7019
    python benchmarks/latent_vs_text.py --limit 40 --max-new-tokens 256

Problems come from the held-out slice of the GSM8K training split (rows 7000 on; the links were fitted on
rows 0-255 and are never trained on this slice). Decoding is greedy.
"""

import argparse
import time
from pathlib import Path

import transformers

from latentgraph.embedded.default_system import default_system
from latentgraph.evaluation.datasets import load_dataset
from latentgraph.evaluation.strict import score_math

transformers.logging.set_verbosity_error()
PAPER = {1: ("1.2x", "34.6%"), 2: ("1.9x", "65.5%"), 3: ("2.4x", "75.6%")}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="GSM8K-format JSONL (question, answer with ####)")
    parser.add_argument("--offset", type=int, default=7000, help="first row of the held-out slice")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per answer and per text message")
    parser.add_argument("--batch", type=int, default=10)
    args = parser.parse_args()

    examples = load_dataset(args.data, format="gsm8k", offset=args.offset, limit=args.limit)
    system = default_system(device="cpu")
    for agent in system.agents.values():
        agent.backbone.load()  # before timing
    print(f"{len(examples)} GSM8K problems (rows {args.offset}-{args.offset + len(examples) - 1}), batches of "
          f"{args.batch}, greedy, max {args.max_new_tokens} new tokens, {system.agents['planner'].latent_steps} "
          "latent steps per agent\n")
    header = (f"{'r':>2}  {'mode':<7}{'seconds':>9}{'tokens':>8}{'accuracy':>10}   {'text/latent time':>17}"
              f"{'token reduction':>17}   {'paper (time, tokens)':>21}")
    print(header)
    print("-" * len(header))
    for rounds in (1, 2, 3):
        results = {}
        for mode in ("latent", "text"):
            seconds, tokens, correct = 0.0, 0, 0
            for start in range(0, len(examples), args.batch):
                batch = examples[start:start + args.batch]
                begin = time.perf_counter()
                out = system.run([e.question for e in batch], rounds=rounds, mode=mode, do_sample=False,
                                 max_new_tokens=args.max_new_tokens)
                seconds += time.perf_counter() - begin
                tokens += out.tokens_out
                correct += sum(score_math(text, e.gold) for text, e in zip(out.texts, batch))
            results[mode] = (seconds, tokens, correct / len(examples))
        for mode, (seconds, tokens, accuracy) in results.items():
            line = f"{rounds:>2}  {mode:<7}{seconds:>9.1f}{tokens:>8}{accuracy:>10.1%}"
            if mode == "text":
                speedup = seconds / results["latent"][0]
                reduction = 1 - results["latent"][1] / tokens
                line += f"   {speedup:>16.2f}x{reduction:>17.1%}   {PAPER[rounds][0]:>12}, {PAPER[rounds][1]}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
