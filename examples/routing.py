"""Routing: a router and two experts; each question goes to one expert, decided per question of the batch.

Runs offline in seconds on tiny random backbones. The route here is a condition of our own on the question
(digits go to the math expert), so it is the same on random models; below it, the same router routing by what
it says (a `said` condition), which needs a model whose words mean something.

    python examples/routing.py
"""

import latentgraph as lg
from latentgraph.core.conditions import register_condition
from latentgraph.testing import tiny_backbone


@register_condition("has_digits")
def has_digits(state):
    """On for the questions that hold a digit."""
    return [any(c.isdigit() for c in question) for question in state.questions]


MATH = {"type": "has_digits"}
OTHER = {"type": "not", "condition": MATH}

model, tokenizer = tiny_backbone("qwen3", hidden_size=64)
agents = [lg.Agent("router", model, tokenizer=tokenizer, latent_steps=4, prompt="Route: {question}"),
          lg.Agent("math", model, tokenizer=tokenizer, latent_steps=4, prompt="{router}Compute: {question}"),
          lg.Agent("writer", model, tokenizer=tokenizer, latent_steps=4, prompt="{router}Explain: {question}"),
          lg.Agent("judge", model, tokenizer=tokenizer, prompt="{math}{writer}Answer: {question}")]
system = lg.System(agents, rounds=1, answer="judge")
# An expert runs for the questions its outgoing edge is on for: the condition sits on both of its edges.
system.connect("router", "math", when=MATH).connect("math", "judge", when=MATH)
system.connect("router", "writer", when=OTHER).connect("writer", "judge", when=OTHER)
print(system.plan(), end="\n\n")

questions = ["What is 17 * 23?", "Why is the sky blue?", "Add 48 and 24.", "Who wrote Hamlet?"]


def show_routes(out):
    """Which expert ran for each question (``AgentStep.rows``: the questions it ran for, None for all)."""
    steps = out.trace[0]
    for i, question in enumerate(questions):
        experts = [name for name in ("math", "writer")
                   if name in steps and (steps[name].rows is None or i in steps[name].rows)]
        print(f"{question!r} -> {' and '.join(experts)}")


show_routes(system.run(questions, do_sample=False, max_new_tokens=8))

# Routing by what the router says: it speaks (a condition reads its text), and its words pick the expert.
SAYS_MATH = {"type": "said", "agent": "router", "pattern": r"\b(math|number|compute)\b"}
said = lg.System([lg.Agent(a.name, model, tokenizer=tokenizer, latent_steps=4, prompt=a.prompt) for a in agents],
                 rounds=1, answer="judge")
said.connect("router", "math", when=SAYS_MATH).connect("math", "judge", when=SAYS_MATH)
said.connect("router", "writer", when={"type": "not", "condition": SAYS_MATH})
said.connect("writer", "judge", when={"type": "not", "condition": SAYS_MATH})
print("\nrouted by what the router says (a random router says no such word: every question goes to the writer):")
show_routes(said.run(questions, do_sample=False, max_new_tokens=8))
