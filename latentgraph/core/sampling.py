"""Decoding settings, and how each row of a batch chooses its next token.

Every row has its own :class:`Sampling` (greedy, or sampled with its temperature, top-p and top-k); rows with
equal settings are warped together. A sampled row draws only from its own ``torch.Generator``, so what it
samples does not depend on the rest of its batch: a question batched with others gets the text it gets alone,
for the same seed. Sampling is by inverse transform: the row draws one uniform number per token it may
sample, up front, and takes the token where that number falls in its cumulative distribution; a batch then
needs no generator call on the device, whatever its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import InputError, shown

MAX_STOPS, MAX_STOP_CHARS = 4, 100  # stop strings, as many as OpenAI's API takes


@dataclass(frozen=True)
class Sampling:
    """How text is decoded. The defaults are the published ones (temperature 0.6, top-p 0.95).

    ``stop``: up to four strings (a single string is one) that end the text where they first occur, as in
    OpenAI's API: the text is cut just before the stop string, which it does not include.
    """

    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, (str, list)):  # one string, or a list of them: kept as a tuple (hashable)
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
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
        if problem := _stop_problem(self.stop):
            problems.append(problem)
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


def _stop_problem(stop: object) -> str | None:
    if not (isinstance(stop, tuple) and all(isinstance(s, str) for s in stop)):
        return f"stop must be a string or a list of strings, got {stop!r:.80}"
    if len(stop) > MAX_STOPS:
        return f"stop takes at most {MAX_STOPS} strings, got {len(stop)}: keep the {MAX_STOPS} that matter most"
    if any(not s for s in stop):
        return "stop strings must not be empty; drop the empty one"
    if too_long := [s for s in stop if len(s) > MAX_STOP_CHARS]:
        return (f"stop strings may have at most {MAX_STOP_CHARS} characters, got {len(too_long[0])} "
                f"({too_long[0][:20]!r}...); use a shorter string that marks the end")
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a count


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def per_row_sampling(sampling: Sampling | Sequence[Sampling], batch: int | None) -> list[Sampling]:
    """One :class:`Sampling` per row: ``sampling`` for every row, or its own per row (``batch`` None: check the
    types only)."""
    if isinstance(sampling, Sampling):
        return [sampling] * (batch or 1)
    if not (isinstance(sampling, (list, tuple)) and sampling and all(isinstance(s, Sampling) for s in sampling)):
        raise InputError(f"sampling must be a Sampling, or a list with one Sampling per question, got {sampling!r:.80}")
    if batch is not None and len(sampling) != batch:
        raise InputError(f"{len(sampling)} Sampling settings for {batch} questions; pass one per question, or a "
                         "single Sampling for all of them")
    return list(sampling)


MAX_SEED = 2**64 - 1  # torch seeds its generators with an unsigned 64-bit integer


def check_seed(seed: object) -> None:
    """Refuse a seed torch cannot take: a non-integer (a bool too), one above ``2**64 - 1``, or a negative one
    (torch would take -1 as ``2**64 - 1``: one seed under two names)."""
    if not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise InputError(f"seed must be an integer from 0 to 2**64 - 1, got {shown(seed)}; pass one in that range, "
                         "e.g. 0")


def per_row_seeds(seed: Any, batch: int | None) -> list[int | None]:
    """One seed per row (None: unseeded): ``seed`` for every row, or its own per row."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * (batch or 1)
    if batch is not None and len(seeds) != batch:
        raise InputError(f"{len(seeds)} seeds for {batch} questions; pass one per question, or a single integer "
                         "for all of them")
    for s in seeds:
        if s is not None:
            check_seed(s)
    return seeds


class TokenPicker:
    """Chooses every row's next token by the row's own settings, from the row's own generator.

    Each sampled row draws ``max_new_tokens`` uniform numbers from its generator when the picker is made (its
    k-th sampled token uses the k-th), so how far a generator advances depends on its row alone.
    """

    def __init__(self, settings: Sequence[Sampling], generators: Sequence[torch.Generator | None] | None = None):
        generators = generators or [None] * len(settings)
        groups: dict[tuple, list[int]] = {}  # rows with equal settings are warped together
        for i, s in enumerate(settings):
            if s.do_sample:
                groups.setdefault((s.temperature, s.top_p, s.top_k), []).append(i)
        self.groups = [(settings[rows[0]].warpers(), rows) for rows in groups.values()]
        self.whole = len(self.groups) == 1 and len(self.groups[0][1]) == len(settings)  # every row alike
        self.draws = torch.zeros(len(settings), max(s.max_new_tokens for s in settings))  # (B, T), on the CPU
        for i, (s, generator) in enumerate(zip(settings, generators)):
            if s.do_sample:
                self.draws[i, :s.max_new_tokens] = _uniforms(s.max_new_tokens, generator)
        self._indices: list[torch.Tensor] | None = None  # each group's rows, on the logits' device

    def __call__(self, logits: torch.Tensor, counts: Sequence[int]) -> list[int]:
        """The next token of each row from its logits (B, V); ``counts[i]``: tokens row ``i`` sampled so far."""
        if not self.groups:
            return logits.argmax(dim=-1).tolist()
        if self.whole:
            return self._sample(logits, *self.groups[0], counts).tolist()
        if self._indices is None:
            self._indices = [torch.tensor(rows, device=logits.device) for _, rows in self.groups]
        picks = logits.argmax(dim=-1)  # greedy rows keep theirs
        for (warpers, rows), index in zip(self.groups, self._indices):
            picks.index_copy_(0, index, self._sample(logits.index_select(0, index), warpers, rows, counts))
        return picks.tolist()

    def _sample(self, scores: torch.Tensor, warpers: LogitsProcessorList, rows: list[int], counts: Sequence[int]
                ) -> torch.Tensor:
        probs = torch.softmax(warpers(None, scores), dim=-1)  # (b, V)
        last = self.draws.shape[1] - 1  # a row that has ended may have used all its draws
        uniform = self.draws[rows, [min(counts[i], last) for i in rows]]  # (b,)
        return inverse_transform(probs, uniform.to(probs.device))


def _uniforms(count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` uniform numbers in [0, 1) from ``generator`` (torch's global one when None), on the CPU."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(count, generator=generator, device=device).cpu()


def inverse_transform(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each row of ``probs`` (b, V), the token where ``uniform`` (b,) falls in its cumulative distribution."""
    cdf = probs.cumsum(dim=-1)  # (b, V)
    total = cdf[:, -1:]
    below = torch.nextafter(total, torch.zeros_like(total))  # past every token but for rounding
    chosen = torch.searchsorted(cdf, torch.minimum(uniform[:, None] * total, below), right=True)
    chosen = chosen.clamp_(max=probs.shape[-1] - 1)  # (b, 1)
    # a device whose cumulative sum rounds unevenly could land on a token of zero probability: take the likeliest
    possible = probs.gather(-1, chosen) > 0
    return torch.where(possible, chosen, probs.argmax(dim=-1, keepdim=True)).squeeze(-1)
