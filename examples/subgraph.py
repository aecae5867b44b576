"""Subgraphs: a team of two experts and a judge, nested as one node between a planner and a solver.

Runs offline in seconds on tiny random backbones (the answers are noise). The team is an ordinary system;
``team.node("team", entry=[...])`` makes it a node of the outer one: the planner's edge into the team reaches
both experts (a link each), and the team's edge to the solver carries what its answer node, the judge, sends.

    python examples/subgraph.py
"""

import latentgraph as lg
from latentgraph.testing import tiny_backbone

qwen, qwen_tokenizer = tiny_backbone("qwen3", hidden_size=64)
llama, llama_tokenizer = tiny_backbone("llama", hidden_size=48)


def agent(name, prompt, backbone=(qwen, qwen_tokenizer)):
    return lg.Agent(name, backbone[0], tokenizer=backbone[1], prompt=prompt, latent_steps=4)


# The team: two experts read the planner's plan (the slot its in-edge fills), the judge weighs them.
expert = "Plan: {planner}\nSolve: {question}"
team = lg.System([agent("algebra", expert), agent("arithmetic", expert, (llama, llama_tokenizer)),
                  agent("judge", "A: {algebra}\nB: {arithmetic}\nPick the better one for: {question}")],
                 answer="judge")
team.connect("algebra", "judge").connect("arithmetic", "judge")

outer = lg.System([agent("planner", "Plan how to solve: {question}"),
                   team.node("team", entry=["algebra", "arithmetic"]),
                   agent("solver", "Team: {team}\n{question}\nAnswer in \\boxed{{}}.", (llama, llama_tokenizer))],
                  rounds=1, answer="solver")
outer.connect("planner", "team").connect("team", "solver")
print(outer, end="\n\n")
print(outer.plan(), end="\n\n")

out = outer.run(["What is 17 * 23?"], do_sample=False, max_new_tokens=8)
print(out.table(), end="\n\n")
print("links:", ", ".join(outer.link_modules()))
print("answer:", repr(out.texts[0]))
