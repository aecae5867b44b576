"""Token generation from prompt embeddings: prefill once, then one token per step on the KV cache.

Positions come from the attention mask (as in rollouts), so a row decodes the same tokens whatever else is
in the batch. Rows that emit an end-of-sequence token stop; the batch stops when every row has.

With tools, every row runs its own tool loop. When a row closes a tool tag (``<python>…</python>``), the
tool runs on the text between the tags and the row is then fed ``<result>…</result>`` one token per step,
on the same KV cache, while the other rows go on sampling: nothing is re-encoded and no row stops for
another. Calls that close in the same step run in parallel, and that step waits for them.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import InputError, shown
from ..tools.base import Tool
from .backbone import Backbone, cache_kwargs
from .think import positions_from_mask


@dataclass(frozen=True)
class Sampling:
    """How text is decoded. The defaults are the published ones (temperature 0.6, top-p 0.95)."""

    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = None
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        problems = []
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            problems.append(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _is_number(self.temperature) or (self.do_sample and not self.temperature > 0):
            problems.append(f"temperature must be a number > 0 when sampling, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            problems.append(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if problems:
            raise InputError("invalid decoding settings: " + "; ".join(problems))

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.do_sample:
            if self.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None:
                warpers.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


MAX_SEED = 2**64 - 1  # torch seeds its generators with an unsigned 64-bit integer


def check_seed(seed: object) -> None:
    """Refuse a seed torch cannot take: a non-integer (a bool too), one above ``2**64 - 1``, or a negative one
    (torch would take -1 as ``2**64 - 1``: one seed under two names)."""
    if not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise InputError(f"seed must be an integer from 0 to 2**64 - 1, got {shown(seed)}; pass one in that range, "
                         "e.g. 0")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a count


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def generate(backbone: Backbone, embeds: torch.Tensor, mask: torch.Tensor, sampling: Sampling,
             generator: torch.Generator | None = None, *, tools: Sequence[Tool] = (),
             max_tool_calls: int = 5) -> list[Generation]:
    """Decode from prompt ``embeds`` (B, L, H); with ``tools``, each row runs its own tool loop."""
    model = backbone.model
    stops = set(stop_token_ids(backbone))
    pad = min(stops) if stops else 0
    warpers = sampling.warpers()
    loop = _ToolLoop(backbone, tools, max_tool_calls, prompt_length=embeds.shape[1], sampling=sampling)
    cache = backbone.new_cache()
    positions = positions_from_mask(mask)
    with_cache = cache_kwargs(model, cache)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **with_cache)
    rows = [Generation(ids=[]) for _ in range(embeds.shape[0])]
    results: list[deque[int]] = [deque() for _ in rows]  # tool-result tokens still to feed, per row
    done = [False] * len(rows)
    for step in range(loop.max_steps):
        logits = out.logits[:, -1].float()  # (B, V)
        if sampling.do_sample:
            probs = torch.softmax(warpers(None, logits), dim=-1)  # (B, V)
            if generator is not None:  # it lives where the embeddings run; a device map may put the head elsewhere
                probs = probs.to(generator.device)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()  # (B,)
        else:
            sampled = logits.argmax(dim=-1).tolist()  # (B,)
        fed, closed = [], []
        for i, row in enumerate(rows):
            if done[i]:
                fed.append(pad)
            elif results[i]:
                fed.append(results[i].popleft())
                row.ids.append(fed[-1])
                if not results[i]:
                    loop.segment[i] = len(row.ids)  # look for the next call after the result
            else:
                fed.append(sampled[i])
                row.ids.append(sampled[i])
                row.sampled += 1
                if sampled[i] in stops or row.sampled == sampling.max_new_tokens:
                    done[i] = True
                elif call := loop.closed_call(i, row):
                    closed.append((i, *call))
        for i, result in loop.run(closed, rows, step):
            if result is None:  # the context window is full: the row ends here
                done[i] = True
            else:
                results[i].extend(result)
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
        tokens = torch.tensor(fed, dtype=torch.long, device=embeds.device)[:, None]  # (B, 1)
        out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **with_cache)
    return rows


class _ToolLoop:
    """Finds closed tool tags in a row's text, runs the tools and turns their answers into tokens."""

    def __init__(self, backbone: Backbone, tools: Sequence[Tool], max_calls: int, prompt_length: int,
                 sampling: Sampling):
        self.tokenizer = backbone.tokenizer
        self.tools = {tool.tag.lower(): tool for tool in tools}
        tags = "|".join(re.escape(tag) for tag in self.tools)
        self.pattern = re.compile(rf"<({tags})>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL) if tools else None
        self.max_calls = max_calls
        limit = backbone.max_positions
        # result tokens must leave room for the rest of the row's sampling budget
        self.room = (limit - prompt_length - sampling.max_new_tokens) if limit else None
        self.fed: dict[int, int] = {}  # per row: result tokens fed so far
        self.segment: dict[int, int] = {}  # per row: where in its ids the text after its last result starts
        self.max_steps = sampling.max_new_tokens + (self.room if self.room is not None else 1 << 20)

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
                space = self.room - self.fed.get(i, 0) - len(head) - len(tail)
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
