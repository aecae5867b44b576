"""Latent rollouts: an agent thinks for ``m`` steps without emitting tokens.

The prompt embeddings are prefilled once; ``h_0`` is the last-layer hidden state at the last prompt
position. Each later step feeds ``inner(h_k)`` back as one new input position, reusing the KV cache, and
reads ``h_{k+1}``. Positions come from the attention mask, so left padding does not change any row.

``use_cache=False`` is the published reference: a full forward over the growing sequence at every step.
It gives the same states (tests check this) at O(m) times the cost, and exists to verify and benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbone import Backbone, cache_kwargs
from .links import placement


@dataclass
class Thoughts:
    """The result of a rollout of ``m`` steps over a batch of ``B`` prompts."""

    hidden: torch.Tensor  # (B, m, H) raw last-layer states h_0 .. h_{m-1}
    embeds: torch.Tensor  # (B, m, H) inner(h_k): the inputs they became; messages are outer(embeds)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: left padding does not shift them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)


def latent_rollout(backbone: Backbone, inner: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                   steps: int, *, use_cache: bool = True, grad_steps: int | None = None) -> Thoughts:
    """Think for ``steps`` latent steps from prompt ``embeds`` (B, L, H) with ``mask`` (B, L).

    Under autograd, ``grad_steps`` keeps only the first that many backbone forwards in the graph (the
    prefill is the first); later states still pass through the inner link with gradients, but nothing
    flows back from them into the backbone. ``None`` keeps every step.
    """
    batch, _, width = embeds.shape
    # Where the inner link computes: under a device map the last layer may run on another device than the
    # embeddings, beside which the link sits.
    to_link = {"device": embeds.device, "dtype": embeds.dtype, **placement(inner)}
    if steps == 0:
        empty = embeds.new_zeros(batch, 0, width)
        return Thoughts(hidden=empty, embeds=empty.to(**to_link))
    decoder = backbone.decoder
    positions = positions_from_mask(mask)
    # Under autograd a cache whose in-place state updates cannot clobber saved tensors (hybrid models);
    # it stays that way through steps past grad_steps, which would otherwise overwrite states saved before.
    cache = backbone.new_cache(autograd=torch.is_grad_enabled()) if use_cache else None
    new_input, hidden, thoughts = embeds, [], []
    for step in range(steps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and (grad_steps is None or step < grad_steps)):
            out = decoder(inputs_embeds=new_input, attention_mask=mask, position_ids=positions,
                          use_cache=use_cache, **cache_kwargs(decoder, cache))
        h = out.last_hidden_state[:, -1]  # (B, H)
        e = inner(h.to(**to_link))  # (B, H), on the link's device, in its dtype
        hidden.append(h)
        thoughts.append(e)
        if step == steps - 1:
            break
        e_in = e.to(embeds.dtype)[:, None]  # (B, 1, H)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        next_position = positions[:, -1:] + 1
        if use_cache:
            new_input, positions = e_in, next_position
        else:
            new_input = torch.cat([new_input, e_in], dim=1)
            positions = torch.cat([positions, next_position], dim=1)
    return Thoughts(hidden=torch.stack(hidden, dim=1), embeds=torch.stack(thoughts, dim=1))
