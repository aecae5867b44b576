"""Deliberation style: a reflector thinks about the task; a tool-caller reasons with tools and answers.

Before the last round the tool-caller thinks instead, and its thoughts return to the reflector as
feedback. In the last round it decodes with its tools: writing ``<python>code</python>`` runs the code in
a sandbox, ``<search>query</search>`` searches, and each answer comes back in ``<result>…</result>``.
By default the tool-caller has the Python tool only; pass ``tools=[PythonTool(), BM25Search(corpus)]``
(or :class:`~latentgraph.tools.TavilySearch`) to add search. Published agents: reflector and tool-caller,
both Qwen3.5-4B (RecursiveMAS, arXiv 2604.25917).
"""

from latentgraph.core.agent import Agent
from latentgraph.core.system import System
from latentgraph.tools import PythonTool, Tool

CHECKPOINTS = {
    "reflector": "RecursiveMAS/Deliberation-Reflector-Qwen3.5-4B",
    "toolcaller": "RecursiveMAS/Deliberation-Toolcaller-Qwen3.5-4B",
    "links": "RecursiveMAS/Deliberation-Outerlinks",
}
LEGACY_KEYS = {"outer_rt": ("reflector", "toolcaller"), "outer_tr": ("toolcaller", "reflector")}
LATENT_STEPS = 32
TOOL_AGENT = "toolcaller"

ANSWER = {
    "math": "Give the final answer in \\boxed{{}}.",
    "code": "Reply with the complete solution in one ```python code block.",
}
REFLECTOR = ("You are the reflector of a two-agent team. Think about what the task below asks, which facts or "
             "computations it needs, and where a solver could go wrong.\n\nTask: {question}")
REFLECTOR_FEEDBACK = ("You are the reflector of a two-agent team. Feedback from the tool-caller's last attempt:\n"
                      "{feedback}\nReflect again on the task below in its light.\n\nTask: {question}")
TOOLCALLER = ("You are the tool-caller of a two-agent team. The reflector's notes:\n{{reflection}}\n"
              "Use them as guidance, call tools when a computation or a fact needs checking, and solve the task."
              "\n\nTask: {{question}}\n\n{answer}")


def system_prompt(tools: list[Tool]) -> str:
    """The system prompt both agents share: how to call each of the tool-caller's tools."""
    usage = "".join(f"\n- {tool.describe()}" for tool in tools)
    calls = (f" You may call these tools by writing their tags:{usage}\nEach result comes back between <result> "
             "and </result>.") if tools else ""
    return f"You solve problems step by step.{calls} Give the final answer in \\boxed{{}}."


def build(backbones: dict, task: str = "math", tools: list[Tool] | None = None) -> System:
    """The deliberation graph on ``backbones`` (``{"reflector": ..., "toolcaller": ...}``); ``tools`` are the
    tool-caller's (default: a sandboxed :class:`~latentgraph.tools.PythonTool`)."""
    tools = [PythonTool()] if tools is None else list(tools)
    reflector = Agent("reflector", backbones["reflector"], REFLECTOR, feedback_prompt=REFLECTOR_FEEDBACK,
                         system_prompt=system_prompt(tools), latent_steps=LATENT_STEPS)
    toolcaller = Agent("toolcaller", backbones["toolcaller"], TOOLCALLER.format(answer=ANSWER[task]),
                          system_prompt=system_prompt(tools), latent_steps=LATENT_STEPS, tools=tools)

    system = System([reflector, toolcaller], rounds=3, answer="toolcaller")
    system.connect("reflector", "toolcaller", slot="reflection")
    system.connect("toolcaller", "reflector", slot="feedback", feedback=True)
    return system
