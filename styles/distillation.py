"""Distillation style: a larger expert plans without giving the answer; a smaller learner follows and answers.

The expert writes an executable plan but never the final answer. Before the last round the learner thinks
instead, and its thoughts return to the expert as feedback.
Published agents: expert Qwen3.5-9B, learner Qwen3.5-4B (RecursiveMAS, arXiv 2604.25917).
"""

from latentgraph.core.agent import Agent
from latentgraph.core.system import System

CHECKPOINTS = {
    "expert": "RecursiveMAS/Distillation-Expert-Qwen3.5-9B",
    "learner": "RecursiveMAS/Distillation-Learner-Qwen3.5-4B",
    "links": "RecursiveMAS/Distillation-Outerlinks",
}
LEGACY_KEYS = {"outer_el": ("expert", "learner"), "outer_le": ("learner", "expert")}
LATENT_STEPS = 32

ANSWER = {
    "math": "Give the final answer in \\boxed{{}}.",
    "code": "Reply with the complete solution in one ```python code block.",
}
EXPERT = ("You are the expert of a two-agent team. Write a concise plan for the task below that a less "
          "experienced solver can carry out step by step (Step 1: ...). Do not state the final answer."
          "\n\nTask: {question}")
EXPERT_FEEDBACK = ("You are the expert of a two-agent team. Feedback from the learner's last attempt:\n{feedback}\n"
                   "Treat it as a hint about where the plan was unclear, and write an improved plan (Step 1: ...). "
                   "Do not state the final answer.\n\nTask: {question}")
LEARNER = ("You are the learner of a two-agent team. The expert's plan:\n{{plan}}\n"
           "Follow the plan, but let the task's constraints win where they disagree.\n\nTask: {{question}}\n\n{answer}")


def build(backbones: dict, task: str = "math") -> System:
    """The distillation graph on ``backbones`` (``{"expert": ..., "learner": ...}``)."""
    expert = Agent("expert", backbones["expert"], EXPERT, feedback_prompt=EXPERT_FEEDBACK,
                      latent_steps=LATENT_STEPS)
    learner = Agent("learner", backbones["learner"], LEARNER.format(answer=ANSWER[task]),
                       latent_steps=LATENT_STEPS)

    system = System([expert, learner], rounds=3, answer="learner")
    system.connect("expert", "learner", slot="plan")
    system.connect("learner", "expert", slot="feedback", feedback=True)
    return system
