"""Sequential style, light agents: a planner writes a step plan, a critic refines it, a solver answers.

In rounds before the last, the solver thinks instead of answering, and its thoughts reach the planner as
feedback in the next round. Published agents: planner Qwen3-1.7B, critic Llama-3.2-1B-Instruct, solver
Qwen2.5-Math-1.5B-Instruct (RecursiveMAS, arXiv 2604.25917).
"""

from latentgraph.core.agent import Agent
from latentgraph.core.system import System

CHECKPOINTS = {
    "planner": "RecursiveMAS/Sequential-Light-Planner-Qwen3-1.7B",
    "critic": "RecursiveMAS/Sequential-Light-Critic-Llama3.2-1B",
    "solver": "RecursiveMAS/Sequential-Light-Solver-Qwen2.5-Math-1.5B",
    "links": "RecursiveMAS/Sequential-Light-Outerlinks",
}
LEGACY_KEYS = {"outer_12": ("planner", "critic"), "outer_23": ("critic", "solver"), "outer_31": ("solver", "planner")}
LATENT_STEPS = 32

ANSWER = {
    "math": "Give the final answer in \\boxed{{}}.",
    "code": "Reply with the complete solution in one ```python code block.",
}
NO_CODE = {"math": "", "code": " Describe the steps only; do not write code."}

PLANNER = ("You are the planner of a team of agents. Write a short plan for the task below as numbered steps "
           "(Step 1: ..., Step 2: ...). Do not solve it.{no_code}\n\nTask: {{question}}")
PLANNER_FEEDBACK = ("You are the planner of a team of agents, revising your plan after the solver's last attempt.\n"
                    "Solver feedback: {{feedback}}\n"
                    "Treat the feedback as a hint; the task's own constraints come first. Write an improved plan as "
                    "numbered steps (Step 1: ...).{no_code}\n\nTask: {{question}}")
CRITIC = ("You are the critic of a team of agents. A draft plan for the task below:\n{{plan}}\n"
          "Fix its mistakes and fill in missing steps, then give only the corrected plan as numbered steps."
          "{no_code}\n\nTask: {{question}}")
SOLVER = ("You are the solver of a team of agents. A reviewed plan:\n{{plan}}\n"
          "Use the plan where it helps, solve the task yourself and check the result.\n\nTask: {{question}}"
          "\n\n{answer}")


def build(backbones: dict, task: str = "math") -> System:
    """The sequential graph on ``backbones`` (``{"planner": ..., "critic": ..., "solver": ...}``)."""
    words = {"no_code": NO_CODE[task], "answer": ANSWER[task]}
    planner = Agent("planner", backbones["planner"], PLANNER.format(**words),
                       feedback_prompt=PLANNER_FEEDBACK.format(**words), latent_steps=LATENT_STEPS)
    critic = Agent("critic", backbones["critic"], CRITIC.format(**words), latent_steps=LATENT_STEPS)
    solver = Agent("solver", backbones["solver"], SOLVER.format(**words), latent_steps=LATENT_STEPS)

    system = System([planner, critic, solver], rounds=3, answer="solver")
    system.connect("planner", "critic", slot="plan")
    system.connect("critic", "solver", slot="plan")
    system.connect("solver", "planner", slot="feedback", feedback=True)
    return system
