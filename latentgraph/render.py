"""Draw a system as a Graphviz diagram.

Agents show their backbone, hidden size and latent steps; the answer node has a double border. Edges show
their link type, dims and parameter count (text edges say ``text``); feedback edges are dashed. Building
the DOT source needs no Graphviz binary; writing SVG or PNG does (Debian package ``graphviz``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import graphviz

from .errors import InputError
from .links import Link

if TYPE_CHECKING:
    from .system import System


def render(system: System, path: str | Path | None = None, *, sizes: bool = True) -> SystemDiagram:
    """Return the system as a ``graphviz.Digraph`` (shown inline by Jupyter; ``.source`` is the DOT text).

    Args:
        system: the system to draw.
        path: also write the drawing there; the suffix picks the format (``.svg``, ``.png``, ``.pdf``,
            or ``.dot``/``.gv`` for the DOT source).
        sizes: show hidden sizes, link dims and parameter counts; ``False`` draws the topology only.
    """
    graph = SystemDiagram(
        "latentgraph",
        graph_attr={"rankdir": "LR"},
        node_attr={"shape": "box", "style": "rounded", "fontname": "Helvetica"},
        edge_attr={"fontname": "Helvetica", "fontsize": "10"},
    )
    for name, agent in system.agents.items():
        title = f"{name} (answer)" if name == system.answer else name
        steps = f"{agent.latent_steps} latent steps"
        tools = [f"tools: {', '.join(f'<{tool.tag}>' for tool in agent.tools)}"] if agent.tools else []
        label = _lines(title, agent.backbone.name_or_path,
                       f"hidden {agent.hidden_size}, {steps}" if sizes else steps, *tools)
        graph.node(name, label, **({"peripheries": "2"} if name == system.answer else {}))
    for edge in system.edges.values():
        if edge.mode == "text":
            lines = ["text"]
        else:
            link = system.links[edge.name]
            kind = link.config.type if isinstance(link, Link) else type(link).__name__
            d_in, d_out = system.agents[edge.src].hidden_size, system.agents[edge.dst].hidden_size
            params = sum(p.numel() for p in link.parameters())
            lines = [f"{kind} {d_in}\u2192{d_out}", f"{_count(params)} params"] if sizes else [kind]
        if edge.slot != edge.src:
            lines.append(f"slot {edge.slot}")
        style = {"style": "dashed", "constraint": "false"} if edge.feedback else {}
        graph.edge(edge.src, edge.dst, _lines(*lines), **style)
    if path is not None:
        _write(graph, Path(path))
    return graph


def _lines(*lines: str) -> str:
    """Join label lines with DOT's line-break escape, escaping backslashes and quotes in the text."""
    return "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n >= 1_000 else str(n)


class SystemDiagram(graphviz.Digraph):
    """A ``graphviz.Digraph`` that Jupyter shows as its DOT text, with how to install Graphviz, when the
    ``dot`` program is missing (a plain Digraph raises there)."""

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs) -> dict:
        try:
            return super()._repr_mimebundle_(include, exclude, **kwargs)
        except graphviz.ExecutableNotFound:
            return {"text/plain": f"{self.source}\n({MISSING_DOT})"}


MISSING_DOT = ("drawing needs the Graphviz 'dot' program: install it (Debian/Ubuntu: apt-get install graphviz; "
               "macOS: brew install graphviz); the DOT text is available without it as render(system).source")
TEXT_FORMATS = ("dot", "gv")


def _write(graph: graphviz.Digraph, path: Path) -> None:
    fmt = path.suffix.lstrip(".").lower()
    if fmt in TEXT_FORMATS:
        content = graph.source.encode()
    elif fmt not in graphviz.FORMATS:
        raise InputError(f"cannot draw to {path}: '.{fmt}' is not a Graphviz output format; use a path ending "
                         "in .svg, .png, .pdf or .dot")
    else:
        try:
            content = graph.pipe(format=fmt)
        except graphviz.ExecutableNotFound:
            raise InputError(f"writing {path}: {MISSING_DOT}") from None
    try:
        path.write_bytes(content)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
