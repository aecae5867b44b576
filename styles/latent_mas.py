"""LatentMAS style: a planner, a critic and a refiner think in turn on one backbone; a judger answers over their cache.

Training-free, as LatentMAS (Zou et al., 2025) is: each agent's inner link is the least-squares realignment from
the backbone's last hidden states to its input embeddings (`closed_form.realign`), and the agents pass their
working memory through KV-cache edges planner -> critic -> refiner -> judger. Each receiver's prompt continues the
cache its sender continued, so the judger decodes the answer over every prompt and every thought before it. One
round, no feedback. Built on the embedded SmolLM2-135M-Instruct (nothing downloaded); `backbones=` puts it on
another backbone.
"""

from __future__ import annotations

from typing import Any

from latentgraph.core.agent import Agent
from latentgraph.core.backbone import get_backbone
from latentgraph.core.system import System
from latentgraph.embedded import backbones as packaged
from latentgraph.embedded.cached_links import fit_once
from latentgraph.embedded.default_system import calibration_texts
from latentgraph.training import closed_form

EMBEDDED = "smollm2-135m"  # the backbone build_default() runs every role on
ROLES = ("planner", "critic", "refiner", "judger")
INNER_LINK = "linear"  # the realignment is one matrix; a linear link holds it exactly
LATENT_STEPS = 8  # thoughts per thinking agent; small, so a CPU answers in seconds
RECIPE = 1  # bump when the graph, the inner link type or the fit changes: it keys the cached realignment

ANSWER = {
    "math": "Put the final answer in \\boxed{{}}.",
    "code": "Reply with the complete solution in one ```python code block.",
}
PLANNER = ("{question}\n\nYou plan for a team. Break this problem into the few steps that solve it, naming the "
           "quantities each step needs. Do not compute the answer.")
CRITIC = ("{question}\n\nYou check a teammate's plan for the problem above. Find the step that is wrong, missing "
          "or misreads the problem, and say how to fix it.")
REFINER = ("{question}\n\nYou merge the plan and the critique above into one corrected plan, step by step. Do "
           "not compute the answer.")
JUDGER = "{question}\n\nYour team has reasoned about this problem above. Solve it step by step. {answer}"


def build(backbones: dict, task: str = "math") -> System:
    """The LatentMAS chain on ``backbones`` (``{role: backbone}`` for each of :data:`ROLES`; give every role
    the same backbone, or ones of the same architecture and sizes, since a KV cache is read only by such)."""
    prompts = {"planner": PLANNER, "critic": CRITIC, "refiner": REFINER,
               "judger": JUDGER.format(question="{question}", answer=ANSWER[task])}
    agents = [Agent(role, backbones[role], prompts[role], latent_steps=0 if role == "judger" else LATENT_STEPS,
                    inner_link=INNER_LINK) for role in ROLES]  # the judger only decodes
    system = System(agents, rounds=1, answer="judger")
    for src, dst in zip(ROLES, ROLES[1:]):
        system.connect(src, dst, mode="kv")
    return system


def build_default(backbones: dict | None = None, task: str = "math", *, fit: bool = True, device: Any = None,
                  dtype: Any = None, **spread: Any) -> System:
    """The style on the embedded backbone (roles in ``backbones`` run on the backbone given there), with its
    inner links realigned on the embedded calibration texts (``fit=False``: left fresh, for drawing).

    On the embedded backbone the realignment is computed once and cached beside the converted backbones.
    """
    given = dict(backbones or {})
    missing = [role for role in ROLES if role not in given]
    if missing:
        shipped = get_backbone(packaged.embedded_backbone(EMBEDDED), device=device, dtype=dtype, **spread)
        given.update(dict.fromkeys(missing, shipped))
    system = build(given, task=task).validate()
    if not fit:
        return system
    if len(missing) == len(ROLES):  # all on the embedded backbone: the same fit on every machine, so cached
        return fit_once(system, "latent_mas", f"{RECIPE}|{shipped.name_or_path}",
                        lambda: closed_form.initialize(system, calibration_texts()))
    return closed_form.initialize(system, calibration_texts())
