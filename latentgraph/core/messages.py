"""What moves between agents in a run: a message on an edge, and a batch of assembled prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .forward import KVPrefix


@dataclass
class Message:
    """What travels on an edge for a batch: latent vectors, one text per row, or a KV cache to continue.

    ``present``: per row, whether the edge carried the message there (a routed edge, :mod:`~latentgraph.core.routing`);
    a row without it reads an empty slot (its latent rows are zeros never read, its text ``""``, its cache
    positions masked). None: every row."""

    latent: torch.Tensor | None = None  # (B, m, d_receiver)
    text: list[str] | None = None
    cache: KVPrefix | None = None
    present: tuple[bool, ...] | None = None

    def reaches(self, row: int) -> bool:
        """Whether the message carries anything for ``row``."""
        return self.present is None or self.present[row]


@dataclass
class Encoded:
    """A batch of assembled prompts, left-padded, and the KV cache they continue (KV edges), if any."""

    embeds: torch.Tensor  # (B, L, H)
    mask: torch.Tensor  # (B, L), 1 for real positions
    text_tokens: list[int]  # per row: prompt positions that are tokens (the rest are latents or padding)
    prefix: KVPrefix | None = None  # what the prompt continues: the caches of its KV in-edges, in edge order
    rows: list[int] | None = None  # the batch rows these rows are, when a routed turn runs a sub-batch (None: all)
