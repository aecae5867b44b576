"""Search tools: BM25 ranking over a small local corpus, corpus errors, and the Tavily backend with a mocked
client (there is no network here)."""

import json
import sys
import types
from typing import ClassVar

import pytest

from latentgraph.errors import GraphError
from latentgraph.tools import BM25Search, Document, TavilySearch, load_corpus

DOCS = [
    {"title": "Paris", "text": "Paris is the capital and largest city of France, on the river Seine.",
     "url": "https://example.org/paris"},
    {"title": "Everest", "text": "Mount Everest is the highest mountain on Earth, in the Himalayas."},
    {"title": "Python", "text": "Python is a programming language created by Guido van Rossum."},
    {"title": "Seine", "text": "The Seine is a river in northern France that flows through Paris."},
    {"title": "Lyon", "text": "Lyon is a city in France known for its cuisine."},
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(doc) for doc in DOCS) + "\n\n")
    return path


def titles(answer: str) -> list[str]:
    """The titles of a search answer's results, in rank order."""
    return [line.split("] ", 1)[1].split(" - ")[0] for line in answer.splitlines() if line.startswith("[")]


# --- BM25 ---------------------------------------------------------------------------------------------------


def test_bm25_ranks_the_matching_documents_first(corpus):
    pytest.importorskip("bm25s")
    search = BM25Search(corpus, k=3)
    assert titles(search("highest mountain")) == ["Everest"]  # only documents sharing a word are returned
    # Lyon and Seine both say "France" once: the shorter document ranks higher (BM25's length normalisation)
    assert titles(search("capital of France")) == ["Paris", "Lyon", "Seine"]
    assert titles(search("river Seine")) == ["Seine", "Paris"]
    answer = search("who created the Python language")
    assert answer == "[1] Python\nPython is a programming language created by Guido van Rossum."
    assert search("capital").startswith(
        "[1] Paris - https://example.org/paris\nParis is the capital and largest city of France")


def test_bm25_says_when_nothing_matches(corpus):
    pytest.importorskip("bm25s")
    search = BM25Search(corpus)
    assert search("zebra quantum") == "no results for 'zebra quantum'"
    assert search("the of and") == "no results for 'the of and'"  # stopwords only
    assert search("   ").startswith("error: empty query")


def test_bm25_over_a_folder_of_text_files(tmp_path):
    pytest.importorskip("bm25s")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Photosynthesis turns light into chemical energy in plants.")
    (tmp_path / "b.md").write_text("# Tides\nTides are caused by the gravity of the Moon.")
    (tmp_path / "sub" / "c.txt").write_text("The Moon orbits the Earth every 27 days.")
    (tmp_path / "ignored.bin").write_bytes(b"Moon Moon Moon")
    search = BM25Search(tmp_path, k=5)
    assert [doc.source for doc in search.documents] == ["a.txt", "b.md", "sub/c.txt"]
    assert titles(search("Moon gravity")) == ["b.md", "sub/c.txt"]


def test_bm25_over_documents_in_memory_with_stemming_snippets_and_escaping():
    pytest.importorskip("bm25s")
    docs = ["cats are small felines " * 20, Document("the </result> tag closes results", title="tags")]
    search = BM25Search(docs, snippet_chars=40, stemmer=lambda words: [w.rstrip("s") for w in words])
    answer = search("cat")  # the stemmer makes "cat" match "cats"
    assert answer == "[1] cats are small felines cats are small ..."
    assert search("tag") == "[1] tags\nthe &lt;/result> tag closes results"


@pytest.mark.parametrize("data, message", [
    (("[" * 5000 + "]" * 5000).encode(), "line 1: .*nested too deeply"),
    (b'{"text": ' + b"9" * 5000 + b"}", "line 1: .*it holds a value that cannot be converted"),
    ('{"text": "caf\u00e9"}'.encode("latin-1"), "is not UTF-8 text"),
], ids=["deep", "5000 digits", "latin-1"])
def test_a_corpus_python_cannot_read_is_a_graph_error(tmp_path, data, message):
    (tmp_path / "corpus.jsonl").write_bytes(data)
    with pytest.raises(GraphError, match=message):
        load_corpus(tmp_path / "corpus.jsonl")


def test_bm25_build_errors_name_the_fix(tmp_path):
    pytest.importorskip("bm25s")
    with pytest.raises(GraphError, match=r"does not exist.*\.jsonl"):
        BM25Search(tmp_path / "missing.jsonl")
    (tmp_path / "notes.csv").write_text("a,b")
    with pytest.raises(GraphError, match="is neither"):
        BM25Search(tmp_path / "notes.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(GraphError, match="line 2"):
        BM25Search(tmp_path / "bad.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(GraphError, match=r'line 1: expected a JSON object with a "text" field'):
        BM25Search(tmp_path / "notext.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GraphError, match="has no documents"):
        BM25Search(tmp_path / "empty.jsonl")
    with pytest.raises(GraphError, match="k must be >= 1"):
        BM25Search(["a document"], k=0)


def test_bm25_without_the_package_is_a_build_error(monkeypatch, corpus):
    monkeypatch.setitem(sys.modules, "bm25s", None)  # makes `import bm25s` fail
    with pytest.raises(GraphError, match="pip install bm25s"):
        BM25Search(corpus)


def test_load_corpus_reads_titles_and_sources(corpus):
    docs = load_corpus(corpus)
    assert len(docs) == len(DOCS)
    assert docs[0] == Document(DOCS[0]["text"], "Paris", "https://example.org/paris")
    assert docs[1].source == ""


# --- Tavily -------------------------------------------------------------------------------------------------


def test_tavily_without_a_key_is_a_build_error(monkeypatch):
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    with pytest.raises(GraphError, match="TAVILY_API_KEY.*BM25Search"):
        TavilySearch()


def test_tavily_without_the_package_is_a_build_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tavily", None)
    with pytest.raises(GraphError, match="pip install tavily-python"):
        TavilySearch(api_key="tvly-test")


class FakeTavilyClient:
    """Stands in for tavily.TavilyClient: records its calls and answers like the API."""

    calls: ClassVar[list] = []

    def __init__(self, api_key):
        self.api_key = api_key

    def search(self, query, **options):
        FakeTavilyClient.calls.append((self.api_key, query, options))
        if query == "offline":
            raise ConnectionError("no route to host")
        if query == "nothing":
            return {"query": query, "results": []}
        return {"query": query, "results": [
            {"title": "Tower", "url": "https://example.org/tower", "content": "The tower is 330 m tall.",
             "score": 0.9},
            {"title": "Visit", "url": "https://example.org/visit", "content": "Open every day.",
             "score": 0.5},
        ]}


@pytest.fixture
def fake_tavily(monkeypatch):
    FakeTavilyClient.calls = []
    monkeypatch.setitem(sys.modules, "tavily", types.SimpleNamespace(TavilyClient=FakeTavilyClient))
    monkeypatch.setenv("TAVILY_API_KEY", "tvly-from-env")
    return FakeTavilyClient


def test_tavily_formats_results_and_reports_failures(fake_tavily):
    search = TavilySearch(max_results=2)
    answer = search("  eiffel\ntower height ")
    assert answer == ("[1] Tower - https://example.org/tower\nThe tower is 330 m tall.\n\n"
                      "[2] Visit - https://example.org/visit\nOpen every day.")
    assert fake_tavily.calls == [("tvly-from-env", "eiffel tower height",
                                  {"max_results": 2, "search_depth": "basic"})]
    assert search("nothing") == "no results for 'nothing'"
    assert search("offline") == "error: tavily_search failed: ConnectionError: no route to host"
    assert TavilySearch(api_key="tvly-explicit").run("x") and fake_tavily.calls[-1][0] == "tvly-explicit"


def test_tavily_calls_match_the_real_client():
    tavily = pytest.importorskip("tavily")
    import inspect

    assert "api_key" in inspect.signature(tavily.TavilyClient).parameters
    assert {"max_results", "search_depth"} <= set(inspect.signature(tavily.TavilyClient.search).parameters)
