"""Mixture style: math, code and science experts think in parallel; a summarizer reads all three and answers.

Before the last round the summarizer thinks instead, and its thoughts go back to every expert as feedback.
Published agents: math DeepSeek-R1-Distill-Qwen-1.5B, code Qwen2.5-Coder-3B, science BioMistral-7B,
summarizer Qwen3.5-2B (RecursiveMAS, arXiv 2604.25917).
"""

from latentgraph.core.agent import Agent
from latentgraph.core.system import System

CHECKPOINTS = {
    "math": "RecursiveMAS/Mixture-Math-DeepSeek-R1-Distill-Qwen-1.5B",
    "code": "RecursiveMAS/Mixture-Code-Qwen2.5-Coder-3B",
    "science": "RecursiveMAS/Mixture-Science-BioMistral-7B",
    "summarizer": "RecursiveMAS/Mixture-Summarizer-Qwen3.5-2B",
    "links": "RecursiveMAS/Mixture-Outerlinks",
}
EXPERTS = ("math", "code", "science")
LEGACY_KEYS = {
    "outer_1s": ("math", "summarizer"), "outer_2s": ("code", "summarizer"), "outer_3s": ("science", "summarizer"),
    "outer_s1": ("summarizer", "math"), "outer_s2": ("summarizer", "code"), "outer_s3": ("summarizer", "science"),
}
LATENT_STEPS = 32

ANSWER = {
    "math": "Give the final answer in \\boxed{{}}.",
    "code": "Reply with the complete solution in one ```python code block.",
}
EXPERT = ("You are the {domain} expert of a team of agents. Look at the task below from a {domain} point of view "
          "and note the facts, methods and pitfalls that matter.\n\nTask: {{question}}")
EXPERT_FEEDBACK = ("You are the {domain} expert of a team of agents. Feedback from the summarizer's last round:\n"
                   "{{feedback}}\nUse it to sharpen your notes on the task below, from a {domain} point of view."
                   "\n\nTask: {{question}}")
SUMMARIZER = ("You are the summarizer of a team of agents. Notes from three experts:\n"
              "Math expert: {{math}}\nCode expert: {{code}}\nScience expert: {{science}}\n"
              "Take what helps, reason step by step and solve the task.\n\nTask: {{question}}\n\n{answer}")


def build(backbones: dict, task: str = "math") -> System:
    """The mixture graph on ``backbones`` (``{"math": ..., "code": ..., "science": ..., "summarizer": ...}``)."""
    experts = [Agent(domain, backbones[domain], EXPERT.format(domain=domain),
                        feedback_prompt=EXPERT_FEEDBACK.format(domain=domain), latent_steps=LATENT_STEPS)
               for domain in EXPERTS]
    summarizer = Agent("summarizer", backbones["summarizer"], SUMMARIZER.format(answer=ANSWER[task]),
                          latent_steps=LATENT_STEPS)

    system = System([*experts, summarizer], rounds=3, answer="summarizer")
    for domain in EXPERTS:
        system.connect(domain, "summarizer")  # slot {math}, {code} or {science}
        system.connect("summarizer", domain, slot="feedback", feedback=True)
    return system
