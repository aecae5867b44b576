"""Prompt assembly, as the published checkpoints were trained.

1. The agent's template is filled: ``{question}`` with the task text, text slots with the sender's text,
   latent slots with private markers.
2. ``[system, user]`` is rendered with the tokenizer's chat template as text (generation prompt on,
   thinking off). A template that rejects a system role gets the system text at the start of the user
   turn, joined by a blank line. A tokenizer without a chat template gets the plain format
   ``PLAIN_FORMAT``, after the system text and a blank line, with the BOS token (if any) in front.
3. The rendered text is split at the markers; each text segment is tokenized on its own without special
   tokens, and the latent messages go between the segments.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from jinja2.exceptions import TemplateError

from ..errors import GraphError

QUESTION = "question"
PLAIN_FORMAT = "### User\n{user}\n\n### Assistant\n"
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: never in real text, kept by chat templates


def marker(slot: str) -> str:
    return f"{_OPEN}{slot}{_CLOSE}"


def scrub(text: str) -> str:
    """Remove marker characters from outside text, so a question cannot forge a slot."""
    return text.replace(_OPEN, "").replace(_CLOSE, "")


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with ``{question}`` and ``{slot}`` placeholders; ``{{`` and ``}}`` are literal braces."""

    text: str

    def __post_init__(self) -> None:
        _ = self.parts  # parse now, so a malformed template fails where it is written

    @cached_property
    def parts(self) -> list[str | tuple[str]]:
        """Literal strings and ``(name,)`` placeholders, in order."""
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as e:
            raise GraphError(f"prompt {self.text!r}: {e}; write literal braces as {{{{ and }}}}") from None
        parts: list[str | tuple[str]] = []
        for literal, name, spec, conversion in parsed:
            if literal:
                parts.append(literal)
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                raise GraphError(
                    f"prompt {self.text!r}: placeholder {field} is not a plain name; use {{question}} or a "
                    "slot name, and write literal braces as {{ and }}"
                )
            parts.append((name,))
        return parts

    @cached_property
    def slots(self) -> list[str]:
        """The placeholders other than ``{question}``, in order of appearance."""
        names = [p[0] for p in self.parts if isinstance(p, tuple) and p[0] != QUESTION]
        return list(dict.fromkeys(names))

    def fill(self, question: str, values: dict[str, str]) -> str:
        out = []
        for part in self.parts:
            out.append(part if isinstance(part, str) else (question if part[0] == QUESTION else values[part[0]]))
        return "".join(out)


def render_chat(tokenizer: Any, system: str | None, user: str) -> str:
    """Render ``[system, user]`` as text, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        text = PLAIN_FORMAT.format(user=user)
        return (tokenizer.bos_token or "") + (f"{system}\n\n{text}" if system else text)
    options = {"tokenize": False, "add_generation_prompt": True, "enable_thinking": False}
    if system:
        try:
            return tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}], **options)
        except TemplateError:  # the template has no system role (e.g. Gemma's)
            user = f"{system}\n\n{user}"
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], **options)


def split_at_markers(text: str, slots: list[str]) -> list[str | tuple[str]]:
    """Split rendered text into literal segments and ``(slot,)`` positions, in order of appearance."""
    pieces: list[str | tuple[str]] = []
    rest = text
    while (start := rest.find(_OPEN)) >= 0:
        end = rest.index(_CLOSE, start)
        pieces.append(rest[:start])
        pieces.append((rest[start + 1:end],))
        rest = rest[end + 1:]
    pieces.append(rest)
    found = [p[0] for p in pieces if isinstance(p, tuple)]
    if sorted(found) != sorted(slots):
        raise GraphError(f"the chat template changed the slots {slots} into {found}; it must keep user text")
    return [p for p in pieces if p != ""]
