"""Draw a system as a Graphviz diagram.

Drawn from :meth:`System.to_networkx <latentgraph.System.to_networkx>`. Agents show their backbone, hidden
size and latent steps; the answer node has a double border. Each edge is drawn as its kind says
(:mod:`~latentgraph.core.edges`): latent edges show their link type, dims and parameter count, text edges say
``text`` (in grey), KV edges ``kv`` (bold); feedback edges are dashed, and conditional edges dotted, with their
condition as a last label line (``when ...``). A nested system is a cluster (``subgraph cluster_<name>``)
holding its agents and the edges between them, drawn once however many inner rounds it runs (its label says
``team (2 rounds)``). Building
the DOT source needs no Graphviz binary; writing SVG or PNG does (Debian package ``graphviz``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import graphviz

from ..errors import InputError

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
    network = system.to_networkx()
    edges = {edge.name: edge for edge in system.graph().edges}
    clusters = {"": graph}  # by nested system ("team", "team.sub"); "" is the system itself
    for name in sorted({node["system"] for _, node in network.nodes(data=True) if node["system"]}):
        _cluster(clusters, name, network.graph["inner_rounds"])
    for name, node in network.nodes(data=True):
        title = f"{name} (answer)" if node["answer"] else name
        steps = f"{node['latent_steps']} latent steps"
        tools = [f"tools: {', '.join(f'<{tag}>' for tag in node['tools'])}"] if node["tools"] else []
        label = _lines(title, node["backbone"], f"hidden {node['hidden_size']}, {steps}" if sizes else steps, *tools)
        clusters[node["system"] or ""].node(name, label, **({"peripheries": "2"} if node["answer"] else {}))
    for src, dst, edge in network.edges(data=True):
        kind, when = edges[edge["name"]].kind, edges[edge["name"]].when
        lines = kind.labels(edge, sizes)
        if edge["slot"] not in (src.rpartition(".")[2], None):
            lines.append(f"slot {edge['slot']}")
        if when is not None:
            lines.append(f"when {when.describe()}")
        style = dict(kind.draw_style)
        if edge["feedback"]:
            style.update(style="dashed", constraint="false")
        if when is not None:  # dotted: it carries its message only where its condition holds
            style["style"] = "dotted"
        inside = network.nodes[src]["system"] if network.nodes[src]["system"] == network.nodes[dst]["system"] else None
        clusters[inside or ""].edge(src, dst, _lines(*lines), **style)
    for name in sorted(clusters, key=len, reverse=True)[:-1]:  # innermost first: a cluster is copied when added
        clusters[name.rpartition(".")[0]].subgraph(clusters[name])
    if path is not None:
        _write(graph, Path(path))
    return graph


def _cluster(clusters: dict[str, graphviz.Digraph], name: str, rounds: dict[str, int]) -> None:
    """The cluster of nested system ``name``, and those of the systems it is nested in; its label says how many
    inner rounds it runs when more than one."""
    if name and name not in clusters:
        _cluster(clusters, name.rpartition(".")[0], rounds)
        label = name if rounds[name] == 1 else f"{name} ({rounds[name]} rounds)"
        clusters[name] = graphviz.Digraph(name=f"cluster_{name}", graph_attr={"label": label, "style": "rounded"})


def _lines(*lines: str) -> str:
    """Join label lines with DOT's line-break escape, escaping backslashes and quotes in the text."""
    return "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)


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
