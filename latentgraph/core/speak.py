"""Token generation from prompt embeddings: prefill once, then one token per step on the KV cache.

Positions come from the attention mask (as in rollouts), so a row decodes the same tokens whatever else is
in the batch. Rows that emit an end-of-sequence token stop; the batch stops when every row has.
:func:`generate` is a generator: after each step it yields what each row newly said
(:class:`~latentgraph.core.detokenize.Decoded`), and it returns every row's :class:`Generation`.

With tools, every row runs its own tool loop. When a row closes a tool tag (``<python>…</python>``), the
tool runs on the text between the tags and the row is then fed ``<result>…</result>`` one token per step,
on the same KV cache, while the other rows go on sampling: nothing is re-encoded and no row stops for
another. Calls that close in the same step run in parallel, and that step waits for them.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Container, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..tools.base import Tool
from .backbone import Backbone
from .detokenize import Decoded, TextStream
from .forward import Forward, KVPrefix
from .sampling import Sampling, TokenPicker, per_row_sampling

T = TypeVar("T")


def stop_token_ids(backbone: Backbone) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(backbone.model, "generation_config", None), backbone.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


@dataclass
class ToolCall:
    """One tool call made while decoding one row."""

    tool: str  # the tool's name
    input: str  # what the model wrote between the tags
    output: str  # what was fed back between <result> and </result>
    seconds: float
    step: int  # the decoding step whose token closed the tag


@dataclass
class Generation:
    """One row's continuation."""

    ids: list[int]  # every token after the prompt: sampled ones and fed tool results, end token included
    sampled: int = 0  # tokens the model chose; max_new_tokens bounds these
    calls: list[ToolCall] = field(default_factory=list)
    text: str = ""  # what the row said: its ids decoded (core.detokenize), cut before a stop string, stripped


@torch.no_grad()  # on a generator function: no_grad holds while it runs, not while it is suspended
def generate(backbone: Backbone, embeds: torch.Tensor, mask: torch.Tensor, sampling: Sampling | Sequence[Sampling],
             generators: Sequence[torch.Generator | None] | None = None, *, tools: Sequence[Tool] = (),
             max_tool_calls: int = 5, cancelled: Container[int] = (), prefix: KVPrefix | None = None
             ) -> Generator[Decoded, None, list[Generation]]:
    """Decode from prompt ``embeds`` (B, L, H); with ``tools``, each row runs its own tool loop.

    ``sampling``: one :class:`Sampling` for every row, or one per row; a row ends at its end token, its
    ``max_new_tokens`` or its first stop string. ``generators``: one per row (None: the row draws from torch's
    global generator); a row samples from its own only. ``cancelled``: rows found in
    it (another thread may add them, to a set, while this runs) end at the next step with the text they have.
    ``prefix``: a :class:`~latentgraph.core.forward.KVPrefix` the prompt continues (its positions come after it).
    Yields each step's new text per row (the pieces of a row add up to its final ``text``); returns one
    :class:`Generation` per row. :func:`run_to_end` drains it.
    """
    settings = per_row_sampling(sampling, embeds.shape[0])
    budget = [s.max_new_tokens for s in settings]
    ends = set(stop_token_ids(backbone))
    pad = min(ends) if ends else 0
    pick = TokenPicker(settings, generators)
    # the positions the prompt's last real token can reach: those of the prefix come first
    before = int(prefix.next_position.max()) if prefix is not None else 0
    loop = _ToolLoop(backbone, tools, max_tool_calls, prompt_length=before + embeds.shape[1], budget=budget)
    forward = Forward(backbone, prefix)
    out = forward(mask, embeds=embeds, logits_to_keep=1, hidden=False)
    rows = [Generation(ids=[]) for _ in range(embeds.shape[0])]
    results: list[deque[int]] = [deque() for _ in rows]  # tool-result tokens still to feed, per row
    done = [False] * len(rows)
    text = TextStream(backbone.tokenizer, [s.stop for s in settings])
    for step in range(loop.max_steps):
        sampled = pick(out.logits[:, -1].float(), [row.sampled for row in rows])  # (B,)
        _cancel(done, cancelled)
        fed, closed = [], []
        for i, row in enumerate(rows):
            if done[i]:
                fed.append(pad)
            elif results[i]:
                fed.append(results[i].popleft())
                row.ids.append(fed[-1])
                if not results[i]:
                    loop.segment[i] = len(row.ids)  # look for the next call after the result
                done[i] = text.add(i, row.ids)  # a stop string in a tool result ends the row too
            else:
                fed.append(sampled[i])
                row.ids.append(sampled[i])
                row.sampled += 1
                if sampled[i] in ends or row.sampled == budget[i] or text.add(i, row.ids):
                    done[i] = True
                elif call := loop.closed_call(i, row):
                    closed.append((i, *call))
        for i, result in loop.run(closed, rows, step):
            if result is None:  # the context window is full: the row ends here
                done[i] = True
            else:
                results[i].extend(result)
        yield text.step([row.ids for row in rows], done)
        _cancel(done, cancelled)  # rows cancelled while the consumer held this step need no more forwards
        if all(done):
            break
        tokens = torch.tensor(fed, dtype=torch.long, device=embeds.device)[:, None]  # (B, 1)
        out = forward(mask.new_ones(len(rows), 1), ids=tokens, logits_to_keep=1, hidden=False)
    if not text.all_ended:  # rows cancelled while the last step was held, or the step budget ran out
        yield text.step([row.ids for row in rows], [True] * len(rows))
    for row, said in zip(rows, text.texts):
        row.text = said
    return rows


def _cancel(done: list[bool], cancelled: Container[int]) -> None:
    """Mark the cancelled rows done (membership tests only: another thread may be adding to ``cancelled``)."""
    for i in range(len(done)):
        if i in cancelled:
            done[i] = True


def run_to_end(steps: Generator[Any, None, T]) -> T:
    """Drive a generator such as :func:`generate` to its end, dropping what it yields; what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


class _ToolLoop:
    """Finds closed tool tags in a row's text, runs the tools and turns their answers into tokens."""

    def __init__(self, backbone: Backbone, tools: Sequence[Tool], max_calls: int, prompt_length: int,
                 budget: list[int]):
        self.tokenizer = backbone.tokenizer
        self.tools = {tool.tag.lower(): tool for tool in tools}
        tags = "|".join(re.escape(tag) for tag in self.tools)
        self.pattern = re.compile(rf"<({tags})>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL) if tools else None
        self.max_calls = max_calls
        limit = backbone.max_positions
        # per row, result tokens must leave room for the rest of its sampling budget (max_new_tokens)
        self.room = [limit - prompt_length - tokens for tokens in budget] if limit else None
        self.fed: dict[int, int] = {}  # per row: result tokens fed so far
        self.segment: dict[int, int] = {}  # per row: where in its ids the text after its last result starts
        self.max_steps = (limit - prompt_length) if limit else max(budget) + (1 << 20)

    def closed_call(self, i: int, row: Generation) -> tuple[Tool, str] | None:
        """The tool and its input, when the row's last token closed a tool tag."""
        if self.pattern is None or ">" not in self._decode(row.ids[-1:]):
            return None
        match = self.pattern.search(self._decode(row.ids[self.segment.get(i, 0):]))
        return (self.tools[match.group(1).lower()], match.group(2).strip()) if match else None

    def run(self, closed: list[tuple[int, Tool, str]], rows: list[Generation], step: int
            ) -> list[tuple[int, list[int] | None]]:
        """Runs this step's calls in parallel; returns each row's result tokens (None: no room left)."""
        if not closed:
            return []
        with ThreadPoolExecutor(max_workers=len(closed)) as pool:
            answers = list(pool.map(lambda c: self._call(c[1], c[2], len(rows[c[0]].calls)), closed))
        fed = []
        for (i, tool, text), (output, seconds) in zip(closed, answers):
            head, body, tail = (self._encode(s) for s in ("\n<result>\n", output, "\n</result>\n"))
            if self.room is not None:
                space = self.room[i] - self.fed.get(i, 0) - len(head) - len(tail)
                if space < 1:
                    rows[i].calls.append(ToolCall(tool.name, text, "", seconds, step))
                    fed.append((i, None))
                    continue
                if len(body) > space:
                    body, output = body[:space], self._decode(body[:space])
            rows[i].calls.append(ToolCall(tool.name, text, output, seconds, step))
            self.fed[i] = self.fed.get(i, 0) + len(head) + len(body) + len(tail)
            fed.append((i, head + body + tail))
        return fed

    def _call(self, tool: Tool, text: str, calls_so_far: int) -> tuple[str, float]:
        if calls_so_far >= self.max_calls:
            return f"error: the limit of {self.max_calls} tool calls is reached; go on without tools", 0.0
        start = time.perf_counter()
        output = tool(text)
        return output, time.perf_counter() - start

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
