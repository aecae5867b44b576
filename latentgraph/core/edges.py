"""Edge kinds: what an edge carries from its sender to its receiver, as registered objects.

An :class:`Edge` names its kind (``connect(..., mode="latent")``); the kind says what the sender must do to
send (think or speak), what travels (a :class:`Message`), where the receiver takes it (a placeholder of its
prompt, or the cache its prompt continues), how the edge is checked and how it is drawn. The engine routes
messages; the kinds make them. Built in:

- ``latent``: an outer link turns the sender's thoughts into input embeddings spliced into a slot;
- ``text``: the sender decodes text, which fills a slot;
- ``kv``: the receiver's prompt continues the sender's KV cache (its prompt and its thoughts), as LatentMAS
  passes working memory; ``kv="thoughts"`` keeps only the thought positions.

A new kind subclasses :class:`EdgeKind` and registers with :func:`register_edge_kind`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import GraphError, InputError
from .config import EDGE_MODES
from .links import placement
from .messages import Encoded, Message

if TYPE_CHECKING:
    from .agent import Agent
    from .conditions import Condition
    from .think import Thoughts


@dataclass(frozen=True)
class Sent:
    """What a sender produced in its turn, from which each outgoing edge makes its message."""

    round: int
    agent: Agent
    prompt: Encoded
    thoughts: Thoughts | None  # when it thought
    texts: list[str] | None  # when it spoke
    differentiable: bool  # training: links run with autograd


class EdgeKind(ABC):
    """What an edge carries. Subclasses set the class attributes and implement :meth:`message`."""

    name: ClassVar[str]
    carries_link: ClassVar[bool] = False  # an outer link maps the sender's width to the receiver's
    thinks: ClassVar[bool] = False  # the sender thinks (a latent rollout) to send it
    speaks: ClassVar[bool] = False  # the sender decodes text to send it
    fills_slot: ClassVar[bool] = True  # it fills a placeholder of the receiver's prompt (else: a cache it continues)
    differentiable: ClassVar[bool] = True  # training can back-propagate through it
    keeps_cache: ClassVar[bool] = False  # the sender's rollout keeps its KV cache for it
    draw_style: ClassVar[dict[str, str]] = {}  # Graphviz edge attributes

    @abstractmethod
    def message(self, edge: Edge, sent: Sent, link: nn.Module | None) -> Message:
        """The message this edge delivers, from what its sender produced."""

    def problems(self, edge: Edge, sender: Agent, receiver: Agent) -> list[str]:
        """What is wrong with this edge between these agents, as sentences with the fix."""
        return []

    def positions(self, sender: Agent, max_new_tokens: int) -> int:
        """At most how many positions its message adds to the receiver's prompt."""
        return 0

    def labels(self, edge: dict[str, Any], sizes: bool) -> list[str]:
        """The lines of its label in a diagram (``edge``: the edge's attributes in ``System.to_networkx``)."""
        return [self.name]

    def options(self) -> dict[str, Any]:
        """Its settings beyond the name, as the config stores them (``{}`` for none)."""
        return {}

    def as_text(self) -> EdgeKind:
        """What the edge carries in the text baseline (``run(mode="text")``): the sender's text, in a slot."""
        return TextEdge()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options().items()))))

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.name!r}{options})"


@dataclass(frozen=True)
class Edge:
    """A directed connection ``src -> dst`` of kind ``kind``; a slot kind fills ``{slot}`` of the receiver's
    prompt. ``when``: the condition under which it carries its message (None: always). ``feedback``: it
    delivers in the next round. ``inner_feedback``: a nested system's feedback edge unrolled between two of
    its inner rounds (:mod:`~latentgraph.core.subsystem`): it delivers in this round, like a forward edge,
    but the receiver reads it as feedback (with its ``feedback_prompt``)."""

    src: str
    dst: str
    slot: str | None
    kind: EdgeKind
    feedback: bool = False
    when: Condition | None = None
    inner_feedback: bool = False

    @property
    def reads_as_feedback(self) -> bool:
        """The receiver reads its message with its ``feedback_prompt``."""
        return self.feedback or self.inner_feedback

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"

    @property
    def mode(self) -> str:
        """The kind's registered name (what ``connect(mode=...)`` took)."""
        return self.kind.name

    @property
    def port(self) -> str:
        """Where the receiver's inbox keeps its message: its slot, or (a cache it continues) its name."""
        return self.slot if self.kind.fills_slot else self.name


class LatentEdge(EdgeKind):
    """An outer link turns the sender's thoughts into input embeddings the receiver reads in a slot."""

    name = "latent"
    carries_link = thinks = True

    def message(self, edge: Edge, sent: Sent, link: nn.Module | None) -> Message:
        with nullcontext() if sent.differentiable else torch.no_grad():
            latent = link(sent.thoughts.embeds.to(**placement(link)))  # (B, m, d_dst)
        if not torch.isfinite(latent).all():
            raise InputError(
                f"edge '{edge.name}': its link produced non-finite values (NaN/inf) in round {sent.round} from finite "
                "thoughts; its weights hold NaN/inf or overflow: reload them from a good checkpoint, or retrain the "
                "link (with a lower learning rate if training diverged)"
            )
        return Message(latent=latent)

    def positions(self, sender: Agent, max_new_tokens: int) -> int:
        return sender.latent_steps

    def labels(self, edge: dict[str, Any], sizes: bool) -> list[str]:
        if not sizes:
            return [edge["link_type"]]
        return [f"{edge['link_type']} {edge['in_dim']}\u2192{edge['out_dim']}", f"{_count(edge['params'])} params"]


class TextEdge(EdgeKind):
    """The sender decodes text; the receiver reads it in a slot."""

    name = "text"
    speaks = True
    differentiable = False
    draw_style = {"color": "gray40", "fontcolor": "gray40"}

    def message(self, edge: Edge, sent: Sent, link: nn.Module | None) -> Message:
        return Message(text=sent.texts)

    def positions(self, sender: Agent, max_new_tokens: int) -> int:
        return max_new_tokens


KV_SCOPES = ("all", "thoughts")


class KVEdge(EdgeKind):
    """The receiver's prompt continues the sender's KV cache: what the sender itself continued (a chain passes
    it on), its prompt and its ``m`` thoughts; with ``kv="thoughts"``, the thought positions only (keeping
    their positions, so the receiver still continues after the sender's full length)."""

    name = "kv"
    thinks = keeps_cache = True
    fills_slot = False
    draw_style = {"style": "bold", "color": "navy", "fontcolor": "navy"}

    def __init__(self, kv: str = "all"):
        if kv not in KV_SCOPES:
            raise GraphError(f"kv={kv!r}: a KV edge passes 'all' (the sender's whole cache) or 'thoughts' "
                             "(its thought positions only)")
        self.scope = kv

    def message(self, edge: Edge, sent: Sent, link: nn.Module | None) -> Message:
        cache = sent.thoughts.cache
        return Message(cache=cache.thoughts_only(sent.thoughts.embeds.shape[1]) if self.scope == "thoughts" else cache)

    def as_text(self) -> EdgeKind:
        return SpokenKVEdge(self.scope)

    def problems(self, edge: Edge, sender: Agent, receiver: Agent) -> list[str]:
        from .forward import kv_problem

        if (problem := kv_problem(sender.backbone, receiver.backbone)) is None:
            return []
        return [f"edge '{edge.name}' is a KV edge, but {problem}; a KV cache is only read by the backbone that "
                "made it (or one of the same architecture and sizes): give both agents the same backbone, or use "
                "mode='latent' (a link maps between widths)"]

    def positions(self, sender: Agent, max_new_tokens: int) -> int:
        return sender.latent_steps  # its prompt's positions are counted where it is known (Plan.check_lengths)

    def labels(self, edge: dict[str, Any], sizes: bool) -> list[str]:
        return ["kv" if self.scope == "all" else "kv (thoughts)"]

    def options(self) -> dict[str, Any]:
        return {} if self.scope == "all" else {"kv": self.scope}


class SpokenKVEdge(KVEdge):
    """A KV edge in the text baseline: the sender speaks, and the receiver continues the cache of its prompt
    and what it said (``kv="thoughts"``: of what it said only), as a text multi-agent system reads its
    teammates' words where the latent one reads their thoughts."""

    thinks = keeps_cache = False
    speaks = True
    differentiable = False

    def message(self, edge: Edge, sent: Sent, link: nn.Module | None) -> Message:
        from .forward import prefill

        backbone, prompt = sent.agent.backbone, sent.prompt
        ids = sent.agent.tokenizer(sent.texts, add_special_tokens=False)["input_ids"]
        width = max(1, max(map(len, ids)))  # an empty text still takes one (masked) position
        padded = torch.tensor([row + [0] * (width - len(row)) for row in ids], device=prompt.embeds.device)
        said_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=padded.device)
        with torch.no_grad():
            cache = prefill(backbone, torch.cat([prompt.embeds, backbone.embed(padded)], dim=1),
                            torch.cat([prompt.mask, said_mask.to(prompt.mask.dtype)], dim=1), prompt.prefix)
        return Message(cache=cache.thoughts_only(width) if self.scope == "thoughts" else cache)

    def as_text(self) -> EdgeKind:
        return self


EDGE_KINDS: dict[str, Callable[..., EdgeKind]] = {}


def register_edge_kind(kind: type[EdgeKind]) -> type[EdgeKind]:
    """Register an :class:`EdgeKind` subclass under its ``name`` (a class decorator)."""
    if not (isinstance(kind, type) and issubclass(kind, EdgeKind)):
        raise GraphError(f"register_edge_kind takes an EdgeKind subclass, got {kind!r}")
    if EDGE_KINDS.get(kind.name, kind) is not kind:
        raise GraphError(f"edge kind {kind.name!r} is already registered by {EDGE_KINDS[kind.name]!r}; choose "
                         "another name")
    EDGE_KINDS[kind.name] = kind
    EDGE_MODES.add(kind.name)
    return kind


for _kind in (LatentEdge, TextEdge, KVEdge):
    register_edge_kind(_kind)


def edge_kind(mode: Any, where: str, **options: Any) -> EdgeKind:
    """The kind ``mode`` names, with its ``options`` (``kv=`` for KV edges); a GraphError naming ``where``."""
    if isinstance(mode, EdgeKind):
        return mode
    if not isinstance(mode, str) or mode not in EDGE_KINDS:
        raise GraphError(f"{where}: mode must be one of {sorted(EDGE_KINDS)}, got {mode!r}")
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return EDGE_KINDS[mode](**given)
    except TypeError:
        raise GraphError(f"{where}: {', '.join(f'{k}=' for k in given)} does not apply to a {mode} edge; "
                         "drop it") from None
    except GraphError as e:
        raise GraphError(f"{where}: {e}") from None


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n >= 1_000 else str(n)
