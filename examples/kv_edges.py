"""KV-cache edges: planner -> critic -> solver, each prompt continuing the cache its sender continued.

A chain of KV edges passes working memory on as LatentMAS does: the critic's prompt continues the planner's
prompt and 6 thoughts; the solver's continues all of that, plus the critic's prompt and 4 thoughts. The trace's
cache_in says how many cache positions each agent's prompt continued. Runs offline in seconds on a tiny random
backbone, so the answer is noise; pass a hub id or a local directory instead and nothing else changes.

    python examples/kv_edges.py
"""

import latentgraph as lg
from latentgraph.testing import tiny_backbone

# A KV cache is read only by the backbone that made it (or one of the same architecture and sizes): one backbone.
model, tokenizer = tiny_backbone("qwen3", hidden_size=64)

planner = lg.Agent("planner", model, tokenizer=tokenizer, latent_steps=6, inner_link="linear",
                   prompt="Plan how to solve: {question}")
critic = lg.Agent("critic", model, tokenizer=tokenizer, latent_steps=4, inner_link="linear",
                  prompt="Check the plan above for: {question}")
solver = lg.Agent("solver", model, tokenizer=tokenizer, prompt="Solve, using the notes above: {question}")

system = lg.System([planner, critic, solver], rounds=1, answer="solver")
system.connect("planner", "critic", mode="kv")  # no slot: the critic's prompt continues the planner's cache
system.connect("critic", "solver", mode="kv")

question = "What is 17 * 23?"
trace = system.run([question], do_sample=False, max_new_tokens=12).trace[0]
for name, step in trace.items():
    print(f"{name:<8} prompt tokens {step.tokens_in[0]:>3}  cache_in {step.cache_in:>3}")
print("solver's cache = planner prompt + 6 thoughts + critic prompt + 4 thoughts:",
      trace["solver"].cache_in == trace["planner"].tokens_in[0] + 6 + trace["critic"].tokens_in[0] + 4)

# kv="thoughts": the solver continues the critic's thought positions only.
system.disconnect("critic", "solver").connect("critic", "solver", mode="kv", kv="thoughts")
out = system.run([question], do_sample=False, max_new_tokens=12)
print(f"with kv='thoughts', the solver's cache_in is {out.trace[0]['solver'].cache_in}")
print("answer:", repr(out.texts[0]))
