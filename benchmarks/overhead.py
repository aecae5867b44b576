"""Engine overhead: a full system run against the bare backbone forwards it performs.

A 3-agent, 3-round sequential system (planner -> critic -> solver, solver -> planner feedback) on random
~100M-parameter backbones of two architectures runs once with hooks that record every top-level backbone
call (its module and inputs). The benchmark then times, interleaved, (a) ``system.run`` and (b) a replay
of exactly those recorded forwards on fresh caches, with nothing else: no prompt assembly, no links, no
sampling, no trace, no events. The ratio (a) / (b) is the engine's overhead. Since (a) and (b) run at
different moments of a shared machine, it also prints a measure that drift cannot touch: the share of each
``system.run`` spent outside the backbone forwards (timed by the same hooks).

    python benchmarks/overhead.py [--repeats 5] [--latent-steps 16] [--max-new-tokens 32] [--batch 4]
"""

import argparse
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config

import latentgraph as lg
from latentgraph.core.backbone import cache_kwargs
from latentgraph.testing import tiny_tokenizer

transformers.logging.set_verbosity_error()

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "What is 17 * 23?",
    "Betty is saving money for a new wallet which costs $100. She has only half of the money she needs.",
]


def backbone_100m(config_class, seed):
    config = config_class(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                          tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


class Recorder:
    """Records the top-level forward calls of the given modules (nested calls are part of their caller) and
    adds up the seconds spent inside them."""

    def __init__(self, modules):
        self.calls, self.depth = [], 0
        self.recording, self.inside, self._entered = True, 0.0, 0.0
        for module in modules:
            module.register_forward_pre_hook(self._enter, with_kwargs=True)
            module.register_forward_hook(self._leave)

    def _enter(self, module, args, kwargs):
        if self.depth == 0:
            if self.recording:
                self.calls.append((module, args, dict(kwargs)))
            self._entered = time.perf_counter()
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth -= 1
        if self.depth == 0:
            self.inside += time.perf_counter() - self._entered


def replay(calls):
    """Run the recorded forwards again, each recorded cache replaced by a fresh one."""
    fresh = {}
    for module, args, kwargs in calls:
        (keyword,) = cache_kwargs(module, None)  # the name this transformers release uses
        cache = kwargs.get(keyword)
        if cache is not None:
            if id(cache) not in fresh:
                fresh[id(cache)] = DynamicCache(config=module.config)
            kwargs = {**kwargs, keyword: fresh[id(cache)]}
        module(*args, **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent-steps", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    tokenizer = tiny_tokenizer()
    llama, qwen = backbone_100m(LlamaConfig, 0), backbone_100m(Qwen2Config, 1)
    planner = lg.Agent("planner", llama, tokenizer=tokenizer, latent_steps=args.latent_steps,
                       prompt="Plan how to solve: {question}",
                       feedback_prompt="Feedback: {feedback}\nImprove your plan for: {question}")
    critic = lg.Agent("critic", qwen, tokenizer=tokenizer, latent_steps=args.latent_steps,
                      prompt="Plan: {planner}\nRefine it for: {question}")
    solver = lg.Agent("solver", llama, tokenizer=tokenizer, latent_steps=args.latent_steps,
                      prompt="Plan: {critic}\n{question}\nAnswer in \\boxed{{}}.")
    system = lg.System([planner, critic, solver], rounds=3, answer="solver")
    system.connect("planner", "critic").connect("critic", "solver")
    system.connect("solver", "planner", slot="feedback", feedback=True)

    questions = (QUESTIONS * args.batch)[: args.batch]
    run = lambda: system.run(questions, do_sample=False, max_new_tokens=args.max_new_tokens)  # noqa: E731
    recorder = Recorder([llama, llama.get_decoder(), qwen, qwen.get_decoder()])
    out = run()
    recorder.recording = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"{args.latent_steps} latent steps, {args.max_new_tokens} new tokens, median of {args.repeats}")
    print(f"{len(recorder.calls)} backbone forwards per run; {out.tokens_out} tokens generated\n")

    system_times, bare_times, outside = [], [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            recorder.inside, start = 0.0, time.perf_counter()
            run()
            system_times.append(time.perf_counter() - start)
            outside.append(1 - recorder.inside / system_times[-1])
            start = time.perf_counter()
            replay(recorder.calls)
            bare_times.append(time.perf_counter() - start)
    system_s, bare_s = statistics.median(system_times), statistics.median(bare_times)
    print(f"{'system.run':<28}{system_s:>8.3f} s")
    print(f"{'bare backbone forwards':<28}{bare_s:>8.3f} s")
    print(f"{'overhead (run / bare)':<28}{system_s / bare_s:>8.3f}x")
    print(f"{'share of system.run spent outside backbone forwards':<52}{statistics.median(outside):>7.1%}")


if __name__ == "__main__":
    main()
