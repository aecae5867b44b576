"""Upper bounds on the sizes a user picks, checked where the values enter, before anything is allocated.

A system file or a flag can ask for any integer: ``"rounds": 1000000000000000000`` would run out of memory
compiling the plan, and a link with ``hidden_dim`` 10**12 would ask for terabytes. Each bound here is far
above what any published system uses, so that only absurd values meet it, and names its fix. Where a user
needs more, the environment variable ``LATENTGRAPH_MAX_<NAME>`` raises it (``LATENTGRAPH_MAX_ROUNDS=5000``);
it is read at each check, so setting ``os.environ`` in Python works too, and a value that is not a whole
number >= 1 is an error at the next check.

Texts have no bound of their own here: a prompt that cannot fit its backbone's context is refused from its
characters before it is tokenized (:meth:`Plan.check_lengths <latentgraph.core.plan.Plan.check_lengths>`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Limit:
    """The largest value one kind of size may take.

    Attributes:
        name: the size, as users write it; also the environment variable's suffix.
        default: the bound when ``LATENTGRAPH_MAX_<NAME>`` is not set.
        unit: what the bound counts, in words (``"latent steps"``).
        fix: how to stay under the bound, said in the error.
    """

    name: str
    default: int
    unit: str
    fix: str

    @property
    def variable(self) -> str:
        """The environment variable that overrides the default."""
        return f"LATENTGRAPH_MAX_{self.name.upper()}"

    def value(self) -> int:
        """The bound in force; :class:`~latentgraph.InputError` with the fix when the environment variable holds
        no valid bound."""
        raw = os.environ.get(self.variable, "")
        if not raw.strip():  # unset, or set to nothing
            return self.default
        text = raw.strip().replace("_", "")
        if not (text.isdigit() and len(text) <= 30 and int(text) >= 1):  # 30 digits: never a slow int()
            raise InputError(f"the environment variable {self.variable} is {raw[:40]!r}, not a whole number >= 1: "
                             f"set it to the most {self.unit} to allow (the default is {self.default:,}), or unset it")
        return int(text)

    def problem(self, count: int, subject: str | None = None) -> str | None:
        """Why ``count`` is refused, with the fix (``subject`` names it, default: the number itself); ``None``
        when it is within the bound and the bound is valid."""
        try:
            bound = self.value()
        except InputError as e:
            return str(e)
        if count <= bound:
            return None
        return (f"{subject or shown(count)} exceeds latentgraph's limit of {bound:,} {self.unit}: {self.fix}, or "
                f"raise the limit with the environment variable {self.variable}")


def shown(count: int) -> str:
    """``count`` for a message: with thousands separators, or its order of magnitude when it is too long to
    print (Python refuses to turn an int of over 4,300 digits into text)."""
    if count.bit_length() <= 200:
        return f"{count:,}"
    return f"about 10^{math.floor(math.log10(abs(count)))}"


ROUNDS = Limit("rounds", 1_000, "rounds", "use fewer rounds")
"""The published systems run 3 rounds. Each round runs every agent's backbone, so 1,000 rounds already take
hours on real models, and a plan holds one turn per agent per round."""

LATENT_STEPS = Limit("latent_steps", 10_000, "latent steps", "use fewer latent steps")
"""The published systems think 32 steps per turn. Each step is one more backbone forward, one after the other,
and one more position in the prompt of every receiver and in the KV cache."""

AGENTS = Limit("agents", 256, "agents", "use fewer agents")
"""The published systems have 2 to 4 agents. Checking and planning a graph go over its agents and edges."""

EDGES = Limit("edges", 4_096, "edges", "use fewer edges")
"""Enough to connect every pair of 64 agents (4,032 edges); each latent edge holds a link."""

LINK_WIDTH = Limit("link_width", 131_072, "hidden units", "lower hidden_dim")
"""The width (``hidden_dim``) of a link's hidden layer: 2^17 is above the layer widths of the largest open LLMs
(Llama 3.1 405B: 16,384 hidden, 53,248 in its MLP)."""

LINK_PARAMETERS = Limit("link_parameters", 2**31, "parameters per link",
                        "lower the link's hidden_dim or pick a smaller link type")
"""About 8.6 GB in fp32, where links are kept; the ``ln_res`` outer link between two backbones as wide as Llama 3.1
405B (16,384) has 1.3 billion parameters. Checked for every link type, before its weights are allocated."""

PATTERN_CHARS = Limit("pattern_chars", 1_000, "characters in a pattern", "shorten the pattern")
"""The regular expression of an edge's ``said`` condition. Routers' patterns are a few words; a system file from
elsewhere could hold a huge one, which Python's ``re`` compiles and backtracks over at a cost that grows with it."""

LIMITS = (ROUNDS, LATENT_STEPS, AGENTS, EDGES, LINK_WIDTH, LINK_PARAMETERS, PATTERN_CHARS)
