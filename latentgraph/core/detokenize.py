"""Incremental detokenization: what each row of a decoding batch has newly said at each step.

A row's text is its tokens decoded without special tokens, cut just before the first stop string, and
stripped of surrounding whitespace. While the row decodes, a step shows only text that can no longer change,
so the pieces a row shows add up to its final text exactly:

- leading whitespace is dropped, and trailing whitespace waits until something else follows it (the final
  strip would remove it);
- an incomplete multi-byte character (it decodes as U+FFFD) waits until its last byte comes;
- an end of text that could be the start of a stop string waits until it is clear whether it is.

Each step decodes only a short window of the newest tokens, not the whole row: the tokens since the text
last grew, together with the ones before them, whose text is subtracted (some tokenizers decode a token
differently at the start of a text). The row's text is made of these windows. It is the text of all its
tokens decoded at once, except in two ways that would change text already shown: spaces before punctuation
are never cleaned up, and where a byte-fallback tokenizer (SentencePiece's ``<0xNN>`` tokens) meets bytes
that are not UTF-8, the characters already complete stay as they were shown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

INCOMPLETE = "\ufffd"  # what a character whose bytes have not all come decodes to


@dataclass(frozen=True)
class Decoded:
    """One decoding step of a batch: per row, the new text to show and whether the row has ended."""

    texts: list[str]
    finished: list[bool]


Decode = Callable[[Sequence[int]], str]


def decoder(tokenizer: Any) -> Decode:
    """Token ids to text, as a row's text is made: special tokens skipped, spaces left as they are. A fast
    tokenizer's own decoder is called directly: its Python wrapper costs four times as much."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return partial(backend.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def earliest(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where in ``text`` (from ``start`` on) the first of ``stops`` begins; None when none occurs."""
    found = [k for k in (text.find(stop, start) for stop in stops) if k >= 0]
    return min(found) if found else None


class RowText:
    """One row's text as its tokens come in."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.longest = max(map(len, self.stops), default=0)
        self.window = 0  # ids[window:read] decode to the end of ``raw``; ids[read:] are not in it yet
        self.read = 0
        self.before = ""  # the text of ids[window:read]
        self.raw = ""  # every complete character decoded so far: neither stripped nor cut
        self.start: int | None = None  # where in raw the shown text begins (its first non-space character)
        self.shown = 0  # raw[start:shown] has been shown
        self.looked = 0  # len(raw) when new_text last looked at it

    def add(self, decode: Decode, ids: Sequence[int]) -> bool:
        """Take in the row's tokens (all of them, the new ones last); True when a stop string now ends it."""
        new = self._pending(decode, ids)
        if not new or new.endswith(INCOMPLETE):
            return False  # nothing new yet (a special token), or a character still incomplete
        searched = len(self.raw)
        self.raw += new
        self.window, self.read = self.read, len(ids)
        self.before = decode(ids[self.window:self.read])
        # a stop string that ends in the new text begins at most longest - 1 characters before it
        return bool(self.stops) and earliest(self.raw, self.stops, max(0, searched - self.longest + 1)) is not None

    def new_text(self) -> str:
        """The text that has become safe to show since the last call."""
        raw = self.raw
        if len(raw) == self.looked:
            return ""  # nothing came in since
        self.looked = len(raw)
        end = len(raw) - self._held_for_stops()
        if self.start is None:
            rest = raw[:end].lstrip()
            if not rest:
                return ""
            self.start = self.shown = end - len(rest)
        while end > self.shown and raw[end - 1].isspace():
            end -= 1
        new, self.shown = raw[self.shown:end], max(self.shown, end)
        return new

    def final_text(self, decode: Decode, ids: Sequence[int]) -> str:
        """The row's text, once it has ended: cut before its first stop string, stripped."""
        text = self.raw + self._pending(decode, ids)
        cut = earliest(text, self.stops)
        return (text if cut is None else text[:cut]).strip()

    def rest(self, final: str) -> str:
        """What is left to show of the row's ``final`` text."""
        return final[self.shown - self.start:] if self.start is not None else final

    def _pending(self, decode: Decode, ids: Sequence[int]) -> str:
        """The text of the tokens that are not in ``raw`` yet."""
        text = decode(ids[self.window:])
        if text.startswith(self.before):
            return text[len(self.before):]
        # The window's first tokens now decode otherwise: a byte-fallback tokenizer turns a whole run of byte
        # tokens into U+FFFD once it is not UTF-8, complete characters included. The new tokens on their own.
        return decode(ids[self.read:])

    def _held_for_stops(self) -> int:
        """How many characters at the end of ``raw`` could be the start of a stop string."""
        held, raw = 0, self.raw
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(raw) - self.shown), held, -1):
                if raw.endswith(stop[:n]):
                    held = n
                    break
        return held


class TextStream:
    """Every row's text in a decoding batch: :meth:`add` a row's tokens as they come, :meth:`step` after each
    decoding step for what to show."""

    def __init__(self, tokenizer: Any, stops: Sequence[Sequence[str]]):
        self.decode = decoder(tokenizer)
        self.rows = [RowText(s) for s in stops]
        self.ended = [False] * len(stops)  # the row's end has been shown
        self.texts = [""] * len(stops)  # each row's final text, once it has ended

    def add(self, i: int, ids: Sequence[int]) -> bool:
        """Take in row ``i``'s tokens; True when a stop string ends the row."""
        return self.rows[i].add(self.decode, ids)

    def step(self, ids: Sequence[Sequence[int]], done: Sequence[bool]) -> Decoded:
        """This step's new text per row; a row that is ``done`` shows the rest of its final text, once."""
        texts, finished = [], []
        for i, row in enumerate(self.rows):
            if self.ended[i]:
                texts.append("")
            elif done[i]:
                self.ended[i] = True
                self.texts[i] = row.final_text(self.decode, ids[i])
                texts.append(row.rest(self.texts[i]))
            else:
                texts.append(row.new_text())
            finished.append(self.ended[i])
        return Decoded(texts=texts, finished=finished)

    @property
    def all_ended(self) -> bool:
        return all(self.ended)
