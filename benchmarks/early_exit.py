"""Early exit on the embedded default system: time and rounds saved, and whether answers change.

Each held-out GSM8K problem (training-split rows 7000 on; the default links were fitted on rows 0-255) runs
alone, greedy, planned for ``--rounds`` rounds, twice, in alternating order: without a stop criterion, and
with ``ThoughtsConverged(tol)``, which stops once the solver's mean thought changes by less than ``tol``
(relative) from one round to the next. It prints, per problem and in total, the seconds of each, how many
rounds ran, the early/full time ratio, whether the answer text changed and whether each was correct, and the
relative change of the solver's thoughts between rounds 1 and 2 (what the criterion compares first).

    python benchmarks/early_exit.py                   # 10 problems, rows 7000-7009, rounds 3, tol 0.05
    python benchmarks/early_exit.py --limit 20 --tol 0.02
"""

import argparse
import statistics
import time
from pathlib import Path

import transformers

from latentgraph.core.stopping import ThoughtsConverged
from latentgraph.embedded.default_system import default_system
from latentgraph.evaluation.datasets import load_dataset
from latentgraph.evaluation.strict import score_math

transformers.logging.set_verbosity_error()
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="GSM8K-format JSONL (question, answer with ####)")
    parser.add_argument("--offset", type=int, default=7000, help="first row of the held-out slice")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    examples = load_dataset(args.data, format="gsm8k", offset=args.offset, limit=args.limit)
    system = default_system(device="cpu")
    for agent in system.agents.values():
        agent.backbone.load()  # before timing
    settings = {"rounds": args.rounds, "do_sample": False, "max_new_tokens": args.max_new_tokens}
    system.run(examples[0].question, **{**settings, "rounds": 1, "max_new_tokens": 2})  # warm up
    print(f"{len(examples)} GSM8K problems (rows {args.offset}-{args.offset + len(examples) - 1}), one at a time, "
          f"greedy, max {args.max_new_tokens} new tokens, planned rounds {args.rounds}, "
          f"ThoughtsConverged(tol={args.tol})\n")
    header = (f"{'row':>5}{'change r1->r2':>15}{'full s':>9}{'early s':>9}{'rounds':>8}{'early/full':>12}"
              f"{'same answer':>13}{'correct full/early':>20}")
    print(header)
    print("-" * len(header))
    totals = {"full": 0.0, "early": 0.0}
    rounds_run, ratios, same, correct = [], [], 0, {"full": 0, "early": 0}
    for i, example in enumerate(examples):
        criterion = ThoughtsConverged(tol=args.tol)
        runs = {}
        order = ("full", "early") if i % 2 == 0 else ("early", "full")  # alternate: drift hits both alike
        for name in order:
            start = time.perf_counter()
            out = system.run(example.question, stop=criterion if name == "early" else None, **settings)
            runs[name] = (time.perf_counter() - start, out)
        (full_s, full), (early_s, early) = runs["full"], runs["early"]
        change = criterion.changes[0].max().item() if criterion.changes else float("nan")
        verdicts = {name: score_math(out.texts[0], example.gold) for name, (_, out) in runs.items()}
        totals["full"] += full_s
        totals["early"] += early_s
        rounds_run.append(early.rounds_run)
        ratios.append(early_s / full_s)
        same += early.texts == full.texts
        for name, ok in verdicts.items():
            correct[name] += ok
        print(f"{args.offset + i:>5}{change:>15.4f}{full_s:>9.1f}{early_s:>9.1f}{early.rounds_run:>8}"
              f"{early_s / full_s:>12.2f}{'yes' if early.texts == full.texts else 'no':>13}"
              f"{str(int(verdicts['full'])) + '/' + str(int(verdicts['early'])):>20}")
    print("-" * len(header))
    print(f"{'all':>5}{'':>15}{totals['full']:>9.1f}{totals['early']:>9.1f}"
          f"{sum(rounds_run) / len(rounds_run):>8.2f}{totals['early'] / totals['full']:>12.2f}"
          f"{f'{same}/{len(examples)}':>13}{str(correct['full']) + '/' + str(correct['early']):>20}")
    print(f"\nstopped early on {sum(r < args.rounds for r in rounds_run)} of {len(examples)} problems; early exit "
          f"took {totals['early'] / totals['full']:.2f}x the time of the full {args.rounds} rounds in total, "
          f"{statistics.median(ratios):.2f}x per problem (median)")


if __name__ == "__main__":
    main()
