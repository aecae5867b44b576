"""Train the links of the embedded default system on GSM8K and compare held-out loss and accuracy.

Three versions of the default system (SmolLM2-135M-Instruct and Gemma 3 270M) are compared on a held-out
slice of the GSM8K training split (rows 7000 on: never used for training or for the closed-form fit):

- random links: PyTorch's default initialisation, as a freshly built system has;
- closed-form links: the default system as shipped (latentgraph.training.closed_form, fitted on rows 0-255);
- trained links: the closed-form system after training its outer links on rows 256 on.

For each: the answer node's held-out cross-entropy on "The answer is N." through the unrolled graph (the
training objective, in the rollout regime: messages come from latent rollouts, as at inference) and strict
accuracy of greedy answers. Backbones stay frozen throughout.

    python benchmarks/train_links.py                  # defaults fit in about 15 minutes on 2 CPU cores
    python benchmarks/train_links.py --steps 60 --eval-limit 40 --output /tmp/trained-default
"""

import argparse
import math
import time
from pathlib import Path

import torch
import transformers

from latentgraph.embedded.default_system import default_system
from latentgraph.evaluation.datasets import load_dataset
from latentgraph.evaluation.strict import score_math
from latentgraph.training.data import load_training_data
from latentgraph.training.loop import TrainConfig, train
from latentgraph.training.objectives import unrolled_loss

transformers.logging.set_verbosity_error()
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def held_out_loss(system, examples, batch_size):
    with torch.no_grad():
        losses = [unrolled_loss(system, examples[i:i + batch_size], regime="rollout").loss.item() * len(
                  examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    return sum(losses) / len(examples)


def accuracy(system, examples, max_new_tokens, batch_size):
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        out = system.run([e.question for e in batch], do_sample=False, max_new_tokens=max_new_tokens)
        correct += sum(score_math(text, e.gold) for text, e in zip(out.texts, batch))
    return correct, len(examples)


def wilson(correct, n, z=1.96):
    p, denominator = correct / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-offset", type=int, default=256)
    parser.add_argument("--train-limit", type=int, default=512)
    parser.add_argument("--eval-offset", type=int, default=7000)
    parser.add_argument("--eval-limit", type=int, default=30)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--regime", default="teacher", choices=["teacher", "rollout"])
    parser.add_argument("--grad-steps", type=int, default=1, help="rollout forwards kept in the graph")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--output", type=Path, default=None, help="save the trained system here")
    args = parser.parse_args()

    train_set = load_training_data(args.data, format="gsm8k", offset=args.train_offset, limit=args.train_limit)
    eval_set = load_training_data(args.data, format="gsm8k", offset=args.eval_offset, limit=args.eval_limit)
    eval_gold = load_dataset(args.data, format="gsm8k", offset=args.eval_offset, limit=args.eval_limit)

    closed = default_system(device="cpu")
    random_links = default_system(device="cpu")
    torch.manual_seed(0)
    for module in random_links.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    rows = {}
    for name, system in (("random links", random_links), ("closed-form links", closed)):
        rows[name] = (held_out_loss(system, eval_set, 5), accuracy(system, eval_gold, args.max_new_tokens, 10))
        print(f"{name}: held-out loss {rows[name][0]:.3f}", flush=True)

    config = TrainConfig(stage="outer", regime=args.regime, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, warmup=max(1, args.steps // 10), grad_steps=args.grad_steps)
    start = time.perf_counter()
    log = train(closed, train_set, config, output=args.output)
    minutes = (time.perf_counter() - start) / 60
    trained = f"trained links ({args.steps} steps, {minutes:.1f} min)"
    rows[trained] = (held_out_loss(closed, eval_set, 5), accuracy(closed, eval_gold, args.max_new_tokens, 10))

    print(f"\ntraining: rows {args.train_offset}-{args.train_offset + len(train_set) - 1}, {config.regime} regime, "
          f"outer links, batch {args.batch_size}, lr {args.lr}; train loss {log[0]['loss']:.3f} -> "
          f"{sum(r['loss'] for r in log[-5:]) / len(log[-5:]):.3f} (mean of last 5 steps)")
    first, last = log[0]["rounds"], log[-1]["rounds"]
    print("gradient reaching each round's critic->solver message, first step -> last step: " + ", ".join(
        f"r{r} {first[r].get('critic->solver', 0):.1e} -> {last[r].get('critic->solver', 0):.1e}" for r in first))
    print(f"held-out: rows {args.eval_offset}-{args.eval_offset + len(eval_set) - 1}\n")
    print(f"{'links':<36}{'held-out answer loss':>22}{'accuracy':>12}{'95% interval':>18}")
    for name, (loss, (correct, n)) in rows.items():
        low, high = wilson(correct, n)
        print(f"{name:<36}{loss:>22.3f}{f'{correct}/{n}':>12}{f'{low:.0%}-{high:.0%}':>18}")


if __name__ == "__main__":
    main()
