"""Search tools: the model writes ``<search>query</search>`` and reads back the best-matching documents.

Two backends answer in the same format. :class:`TavilySearch` searches the web through the Tavily API (the
optional ``tavily-python`` package and an API key); :class:`BM25Search` ranks a local corpus offline with BM25
(the ``bm25s`` package). Neither ever makes results up: a missing key, package or corpus is a
:class:`~latentgraph.errors.GraphError` when the tool is built, and a query with no match says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import GraphError
from ..files.text import parse_json, read_text
from .base import Tool

_TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    """One searchable text; ``title`` and ``source`` (a URL or a file path) are shown with it when known."""

    text: str
    title: str = ""
    source: str = ""


def format_results(query: str, documents: Sequence[Document], snippet_chars: int) -> str:
    """The answer of a search tool: numbered results, each a header line and its text on one line.

    Args:
        query: the query, quoted when nothing matched.
        documents: the hits, best first.
        snippet_chars: longest text shown per hit.

    Returns:
        The formatted results, or ``no results for '<query>'``.
    """
    if not documents:
        return f"no results for {query!r}"
    blocks = []
    for rank, doc in enumerate(documents, 1):
        text = " ".join(doc.text.split())
        if len(text) > snippet_chars:  # cut at the last space that keeps it short enough, if there is one
            head = text[:snippet_chars + 1]
            text = (head.rsplit(" ", 1)[0] if " " in head else head[:snippet_chars]) + " ..."
        header = " - ".join(part for part in (doc.title, doc.source) if part)
        blocks.append(f"[{rank}] {header}\n{text}" if header else f"[{rank}] {text}")
    return "\n\n".join(blocks)


def load_corpus(path: str | Path) -> list[Document]:
    """Reads a local corpus.

    Args:
        path: a ``.jsonl`` file with one object per line (``"text"``, and optionally ``"title"`` and
            ``"source"`` or ``"url"``), or a folder whose ``.txt`` and ``.md`` files, searched recursively,
            are one document each.

    Returns:
        The documents, in file order (folders: sorted by path).

    Raises:
        GraphError: the path does not exist, is neither a ``.jsonl`` file nor a folder, or a line is
            malformed.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix in _TEXT_SUFFIXES and f.is_file())
        return [Document(f.read_text(errors="replace"), source=str(f.relative_to(path))) for f in files]
    if not (path.is_file() and path.suffix == ".jsonl"):
        problem = "is neither a .jsonl file nor a folder" if path.exists() else "does not exist"
        raise GraphError(f'search corpus {path} {problem}; pass a .jsonl file with one {{"text": ...}} '
                         f"object per line, or a folder of {'/'.join(_TEXT_SUFFIXES)} files")
    documents = []
    for number, line in enumerate(read_text(path, error=GraphError).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = parse_json(line)
            text = record["text"]
        except (ValueError, TypeError, KeyError) as err:
            raise GraphError(f'search corpus {path}, line {number}: expected a JSON object with a "text" '
                             f"field ({type(err).__name__}: {err})") from err
        documents.append(Document(str(text), str(record.get("title", "")),
                                  str(record.get("source") or record.get("url") or "")))
    return documents


class BM25Search(Tool):
    """Offline search: ranks the documents of a local corpus against the query with BM25.

    Args:
        corpus: a ``.jsonl`` file or a folder of text files (see :func:`load_corpus`), or the documents
            themselves (:class:`Document` objects or strings).
        k: most results per query.
        snippet_chars: longest text shown per result.
        stemmer: optional word stemmer, e.g. ``Stemmer.Stemmer("english").stemWords`` from PyStemmer, so
            that "planets" matches "planet".
        max_chars: longest answer handed back to the model.

    Raises:
        GraphError: ``bm25s`` is not installed, or the corpus is missing, malformed or empty.
    """

    name = "bm25_search"
    tag = "search"
    description = "searches a local document collection by keywords (BM25) and returns the best matches"

    def __init__(self, corpus: str | Path | Sequence[Document | str], *, k: int = 3, snippet_chars: int = 600,
                 stemmer: Callable | None = None, max_chars: int = 4000):
        try:
            import bm25s
        except ImportError as err:
            raise GraphError("BM25Search needs the bm25s package: pip install bm25s") from err
        from_path = isinstance(corpus, (str, Path))
        if from_path:
            self.documents = load_corpus(corpus)
        else:
            self.documents = [doc if isinstance(doc, Document) else Document(str(doc)) for doc in corpus]
        if not self.documents:
            raise GraphError(f"BM25Search: the corpus{f' {corpus}' if from_path else ''} has no documents; "
                             "add .jsonl lines or text files")
        if k < 1:
            raise GraphError(f"BM25Search: k must be >= 1, got {k}")
        self.k, self.snippet_chars, self.max_chars = k, snippet_chars, max_chars
        self._bm25s, self._stemmer = bm25s, stemmer
        self._index = bm25s.BM25()
        self._index.index(self._tokenize([f"{doc.title}\n{doc.text}" for doc in self.documents]),
                          show_progress=False)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, return_ids=False,
                                    show_progress=False)

    def run(self, text: str) -> str:
        """Returns the documents that match the query, best first (only those sharing a word with it)."""
        query = " ".join(text.split())
        if not query:
            return "error: empty query; write search words between <search> and </search>"
        ids, scores = self._index.retrieve(self._tokenize([query]), k=min(self.k, len(self.documents)),
                                           show_progress=False)
        hits = [self.documents[i] for i, score in zip(ids[0], scores[0]) if score > 0]
        return format_results(query, hits, self.snippet_chars)


class TavilySearch(Tool):
    """Web search through the Tavily API.

    Args:
        api_key: the Tavily API key; by default the ``TAVILY_API_KEY`` environment variable.
        max_results: most results per query.
        search_depth: Tavily's ``"basic"`` or ``"advanced"`` search.
        snippet_chars: longest text shown per result.
        max_chars: longest answer handed back to the model.

    Raises:
        GraphError: no API key is given or set, or ``tavily-python`` is not installed.
    """

    name = "tavily_search"
    tag = "search"
    description = "searches the web and returns the top results with title, URL and text"

    def __init__(self, api_key: str | None = None, *, max_results: int = 3,
                 search_depth: Literal["basic", "advanced"] = "basic", snippet_chars: int = 600,
                 max_chars: int = 4000):
        api_key = api_key or os.environ.get("TAVILY_API_KEY")
        if not api_key:
            raise GraphError("TavilySearch needs an API key: set TAVILY_API_KEY or pass api_key=...; "
                             "for offline search use BM25Search over a local corpus")
        try:
            from tavily import TavilyClient
        except ImportError as err:
            raise GraphError("TavilySearch needs the tavily-python package: "
                             "pip install tavily-python") from err
        self._client = TavilyClient(api_key=api_key)
        self.max_results, self.search_depth = max_results, search_depth
        self.snippet_chars, self.max_chars = snippet_chars, max_chars

    def run(self, text: str) -> str:
        """Returns Tavily's top results for the query (network errors reach the model as an error line)."""
        query = " ".join(text.split())
        if not query:
            return "error: empty query; write search words between <search> and </search>"
        response = self._client.search(query, max_results=self.max_results, search_depth=self.search_depth)
        hits = [Document(r.get("content") or "", r.get("title") or "", r.get("url") or "")
                for r in response.get("results", [])]
        return format_results(query, hits, self.snippet_chars)
