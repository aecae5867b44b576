"""On an accelerator: bf16 against fp32, and rollout, decoding and evaluation throughput at batch 16.

A ~1.5B-parameter random Qwen2-style backbone (hidden 1536, 32 layers, the tiny test tokenizer's vocabulary)
serves a two-agent system, planner -> solver with solver -> planner feedback, 2 rounds. The same weights run
in fp32 and in bf16, and the script prints:

- agreement: the cosine similarity of each agent's latent thoughts (bf16 against fp32) in each round, and
  how many final answers are identical, and the share of greedy tokens that match before the first
  difference when an agent speaks from the same question (random weights give flat next-token
  distributions, so this is a lower bound of what a trained model shows);
- throughput, per dtype: latent rollout (thoughts per second: batch x latent steps / time), decoding (new
  tokens per second, greedy, counting the tokens each row generated) and evaluation (questions per second
  through ``evaluate``, both rounds, scoring included).

    python benchmarks/gpu.py                       # on a GPU machine
    python benchmarks/gpu.py --small --device cpu  # a tiny model, to check the script itself
"""

import argparse
import copy
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

import latentgraph as lg
from latentgraph.core.speak import Sampling, run_to_end
from latentgraph.evaluation.datasets import Example
from latentgraph.evaluation.runner import evaluate
from latentgraph.testing import tiny_tokenizer

transformers.logging.set_verbosity_error()

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


def random_backbone(tokenizer, small: bool):
    """A random Qwen2-style causal LM: ~1.5B parameters, or a tiny one with ``small``."""
    hidden, layers, mlp, heads, kv = (64, 2, 128, 4, 2) if small else (1536, 32, 8960, 12, 2)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def two_agent_system(model, tokenizer, latent_steps: int, like: lg.System | None = None) -> lg.System:
    """planner -> solver, solver -> planner feedback; with the link weights of ``like`` when given."""
    planner = lg.Agent("planner", model, tokenizer=tokenizer, prompt="Plan how to solve: {question}",
                       feedback_prompt="Feedback: {feedback}\nImprove your plan for: {question}",
                       latent_steps=latent_steps)
    solver = lg.Agent("solver", model, tokenizer=tokenizer, latent_steps=latent_steps,
                      prompt="Plan: {planner}\n{question}\nAnswer in \\boxed{{}}.")
    system = lg.System([planner, solver], rounds=2, answer="solver")
    system.connect("planner", "solver").connect("solver", "planner", slot="feedback", feedback=True)
    if like is not None:
        for name, module in system.link_modules().items():
            module.load_state_dict(like.link_modules()[name].state_dict())
    return system


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    """Median seconds of ``fn`` after one warm-up call, and its last result."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def agreement(systems: dict, questions: list[str], max_new_tokens: int) -> None:
    outputs = {dtype: system.run(questions, do_sample=False, max_new_tokens=max_new_tokens, return_latents=True)
               for dtype, system in systems.items()}
    full, half = outputs["fp32"], outputs["bf16"]
    for r, (a, b) in enumerate(zip(full.latents, half.latents), start=1):
        for agent in a:
            cosine = torch.nn.functional.cosine_similarity(a[agent].float(), b[agent].float(), dim=-1)  # (B, m)
            print(f"  round {r}, {agent}'s thoughts: cosine bf16 vs fp32 mean {cosine.mean():.4f}, "
                  f"min {cosine.min():.4f}")
    same_texts = sum(x == y for x, y in zip(full.texts, half.texts))
    print(f"  final answers identical: {same_texts}/{len(questions)}")
    generations = {}
    for dtype, system in systems.items():
        agent = system.agents["planner"]
        with torch.no_grad():
            prompt = agent.encode(questions, agent.template(feedback=False), {})
            generations[dtype] = run_to_end(agent.speak(prompt, Sampling(do_sample=False,
                                                                            max_new_tokens=max_new_tokens)))
    same, total = 0, 0
    for x, y in zip(generations["fp32"], generations["bf16"]):
        ids_x, ids_y = list(x.ids), list(y.ids)
        same += next((i for i, (p, q) in enumerate(zip(ids_x, ids_y)) if p != q), min(len(ids_x), len(ids_y)))
        total += len(ids_x)
    print(f"  greedy tokens (planner, from the question) equal before the first difference: {same}/{total} "
          f"({same / max(total, 1):.0%})")


def throughput(system: lg.System, device, batch: int, max_new_tokens: int, repeats: int, questions: int) -> dict:
    agent = system.agents["planner"]
    template = agent.template(feedback=False)
    with torch.no_grad():
        prompt = agent.encode([QUESTION] * batch, template, {})
        rollout, _ = timed(lambda: agent.think(prompt), device, repeats)
        greedy = Sampling(do_sample=False, max_new_tokens=max_new_tokens)
        decoding, generations = timed(lambda: run_to_end(agent.speak(prompt, greedy)), device, repeats)
    examples = [Example(id=str(i), question=f"{QUESTION} (case {i})", gold="90", kind="math") for i in range(questions)]
    synchronize(device)
    start = time.perf_counter()
    evaluate(system, examples, batch_size=batch, max_new_tokens=max_new_tokens, progress=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"rollout": batch * agent.latent_steps / rollout,
            "decoding": sum(g.sampled for g in generations) / decoding, "evaluation": questions / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny model instead of ~1.5B (to test the script)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--latent-steps", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--questions", type=int, default=64, help="questions evaluated per dtype")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    tokenizer = tiny_tokenizer()
    model = random_backbone(tokenizer, args.small)
    params = sum(p.numel() for p in model.parameters())
    models = {"fp32": model.to(device), "bf16": copy.deepcopy(model).to(device, torch.bfloat16)}
    full = two_agent_system(models["fp32"], tokenizer, args.latent_steps)
    systems = {"fp32": full, "bf16": two_agent_system(models["bf16"], tokenizer, args.latent_steps, like=full)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, random Qwen2-style backbone {params / 1e9:.2f}B parameters, "
          f"batch {args.batch}, {args.latent_steps} latent steps, {args.max_new_tokens} new tokens\n")
    print("agreement (2 rounds, greedy):")
    agreement(systems, [f"{QUESTION} (case {i})" for i in range(args.batch)], args.max_new_tokens)
    print(f"\n{'dtype':<6}{'rollout thoughts/s':>20}{'decoding tokens/s':>19}{'evaluation questions/s':>24}")
    rates = {}
    for dtype, system in systems.items():
        rates[dtype] = throughput(system, device, args.batch, args.max_new_tokens, args.repeats, args.questions)
        r = rates[dtype]
        print(f"{dtype:<6}{r['rollout']:>20.1f}{r['decoding']:>19.1f}{r['evaluation']:>24.2f}")
    ratio = {k: rates["bf16"][k] / rates["fp32"][k] for k in rates["fp32"]}
    print(f"{'bf16/fp32':<6}{ratio['rollout']:>19.2f}x{ratio['decoding']:>18.2f}x{ratio['evaluation']:>23.2f}x")


if __name__ == "__main__":
    main()
