"""Closed-form link initialisation: links that mean something before any training.

``realign`` (inner links) maps a backbone's last hidden state to its own input-embedding space by the
least-squares map from output to input embeddings (as in LatentMAS):

    A = argmin ||W_out A - W_in||^2 + lam ||A||^2 = (W_out^T W_out + lam I)^-1 W_out^T W_in

where row v of ``W_out`` is token v's unembedding vector and row v of ``W_in`` its input embedding (taken
through the embedding module, so Gemma's scaling is included). ``A`` is then scaled so that mapped hidden
states of real text have the mean norm of real input embeddings.

``bridge`` (outer links) fits a ridge regression on a small text corpus from what the sender sends (its
inner link applied to its hidden states) to what the receiver would read for the same text: the receiver's
input embedding of the token the sender predicts next (re-tokenized with the receiver's tokenizer).

Both write the fitted map into the link through its type's :meth:`~latentgraph.Link.fit_affine`, so a
user-registered type that implements it can be initialised too. ``linear`` and ``res_linear`` links
represent the map exactly. The ``ln_res`` links end in a LayerNorm, so their fit is approximate: the MLP
branch is zeroed (training then starts from the fitted map, as LoRA starts from zero), the map goes into
the residual branch (``residual_proj``; the identity for inner links) and the final LayerNorm's scale and
shift are fitted per dimension to the targets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.forward import Forward
from ..core.links import Link, placement
from ..errors import GraphError

if TYPE_CHECKING:
    from ..core.agent import Agent
    from ..core.edges import Edge
    from ..core.graph import Graph
    from ..core.system import System


@torch.no_grad()
def initialize(system: System, texts: list[str], *, max_tokens: int = 4096) -> System:
    """Realign every agent's inner link, then bridge every latent edge, on ``texts``.

    Each backbone reads the texts once, however many agents share it.
    """
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    maps: dict[int, torch.Tensor] = {}

    def states_of(agent: Agent) -> tuple[torch.Tensor, torch.Tensor]:
        if id(agent.backbone) not in states:
            states[id(agent.backbone)] = hidden_states(agent, texts, max_tokens)
        return states[id(agent.backbone)]

    graph = system.graph()  # a nested system's agents and links too
    for agent in graph.agents.values():
        hidden = states_of(agent)[0]
        if id(agent.backbone) not in maps:
            maps[id(agent.backbone)] = realignment(agent, hidden)
        _write_realigned(agent, maps[id(agent.backbone)], hidden)
    for edge in graph.edges:
        if edge.kind.carries_link:
            _bridge(graph, edge, *states_of(graph.agents[edge.src]))
    return system


@torch.no_grad()
def realign(agent: Agent, texts: list[str], *, max_tokens: int = 4096) -> None:
    """Set ``agent``'s inner link to the output-to-input embedding realignment (see the module docstring)."""
    hidden, _ = hidden_states(agent, texts, max_tokens)
    _write_realigned(agent, realignment(agent, hidden), hidden)


@torch.no_grad()
def bridge(system: System, edge: str, texts: list[str], *, max_tokens: int = 4096) -> None:
    """Fit the outer link of ``edge`` (``"src->dst"``; into a nested system, ``"src->team.a"``) by ridge
    regression on ``texts``."""
    graph = system.graph()
    edges = {e.name: e for e in graph.edges if e.kind.carries_link}
    if edge not in edges:
        raise GraphError(f"no latent edge '{edge}' to bridge; latent edges are {list(edges)}")
    _bridge(graph, edges[edge], *hidden_states(graph.agents[edges[edge].src], texts, max_tokens))


def realignment(agent: Agent, hidden: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """The realignment matrix ``A`` (H, H), scaled so that ``hidden @ A`` has the mean input-embedding norm."""
    model = agent.model
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    with _weights_at_hand(head):
        w_out = head.weight  # (V, H)
        width = w_out.shape[1]
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros_like(gram)
        vocab, in_norm = w_out.shape[0], 0.0
        for start in range(0, vocab, 32768):  # chunks: Gemma's 262k x 640 embeddings in one piece are 0.7 GB
            ids = torch.arange(start, min(start + 32768, vocab))
            out_rows = w_out[ids.to(w_out.device)].double().cpu()  # (n, H)
            in_rows = embed(ids.to(agent.backbone.device)).double().cpu()  # (n, H)
            gram += out_rows.T @ out_rows
            cross += out_rows.T @ in_rows
            in_norm += in_rows.norm(dim=-1).sum().item()
    lam = ridge * gram.diagonal().mean()
    matrix = torch.linalg.solve(gram + lam * torch.eye(width, dtype=gram.dtype), cross)
    return matrix * (in_norm / vocab) / (hidden.double() @ matrix).norm(dim=-1).mean()


@contextmanager
def _weights_at_hand(module: nn.Module) -> Iterator[None]:
    """Inside, ``module.weight`` holds its values even when a device map offloaded it (to the meta device):
    accelerate brings it to the module's execution device for the time being."""
    if getattr(module, "_hf_hook", None) is None:  # no device map: the weight is where it is
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


def _write_realigned(agent: Agent, matrix: torch.Tensor, hidden: torch.Tensor) -> None:
    _write(agent.inner_link, matrix, torch.zeros(len(matrix), dtype=matrix.dtype), hidden.double(),
           f"agent '{agent.name}' inner link")


def _bridge(graph: Graph, edge: Edge, hidden: torch.Tensor, next_ids: torch.Tensor, ridge: float = 1e-2) -> None:
    src, dst = graph.agents[edge.src], graph.agents[edge.dst]
    inner = src.inner_link
    sent = inner(hidden.to(**placement(inner))).double().cpu()  # what the sender sends, (N, H_src)
    inputs, targets = [], []
    dst_embed = dst.model.get_input_embeddings()
    for row, text in enumerate(src.tokenizer.decode([token]) for token in next_ids.tolist()):
        if not text.strip() or "\ufffd" in text:  # a lone byte of a multi-byte character: no clean target
            continue
        dst_ids = dst.tokenizer(text, add_special_tokens=False)["input_ids"]
        if dst_ids:
            inputs.append(sent[row])
            targets.append(dst_embed(torch.tensor(dst_ids, device=dst.backbone.device)).double().mean(0).cpu())
    if len(inputs) < 16:
        raise GraphError(f"edge '{edge.name}': bridge found only {len(inputs)} token pairs; give it more text")
    x, y = torch.stack(inputs), torch.stack(targets)  # (n, H_src), (n, H_dst)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc
    lam = ridge * gram.diagonal().mean()
    weight = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xc.T @ (y - y_mean))
    _write(graph.links[edge.name], weight, y_mean - x_mean @ weight, x, f"edge '{edge.name}' link", targets=y)


def hidden_states(agent: Agent, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer hidden states of the agent's backbone over ``texts`` (up to ``max_tokens`` positions in
    all), each with the id of the token that follows it in the text."""
    states, next_ids, total = [], [], 0
    for text in texts:
        tokens = agent.tokenizer(text, return_tensors="pt")["input_ids"][:, : max_tokens - total]
        if tokens.shape[1] < 2:
            continue
        tokens = tokens.to(agent.backbone.device)
        out = Forward(agent.backbone, keep=False)(torch.ones_like(tokens), ids=tokens)
        states.append(out.hidden[0, :-1].float().cpu())  # (T - 1, H): the last has no next token
        next_ids.append(tokens[0, 1:])
        total += tokens.shape[1]
        if total >= max_tokens:
            break
    if not states:
        raise GraphError(f"agent '{agent.name}': the calibration texts are empty")
    return torch.cat(states), torch.cat(next_ids)


def _write(link: nn.Module, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, where: str,
           targets: torch.Tensor | None = None) -> None:
    """Write ``y = x @ weight + bias`` into ``link`` through its type's :meth:`~latentgraph.Link.fit_affine`."""
    if not isinstance(link, Link):
        raise GraphError(f"{where} is a plain {type(link).__name__}; closed-form initialisation writes Link "
                         "types that implement Link.fit_affine; train it instead")
    try:
        link.fit_affine(weight.float(), bias.float(), x.float(), None if targets is None else targets.float())
    except GraphError as e:
        raise GraphError(f"{where}: {e}") from None
