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

from ..errors import InputError
from .backbone import Backbone
from .forward import Forward, KVPrefix, prefill
from .links import placement


@dataclass
class Thoughts:
    """The result of a rollout of ``m`` steps over a batch of ``B`` prompts."""

    hidden: torch.Tensor  # (B, m, H) raw last-layer states h_0 .. h_{m-1}
    embeds: torch.Tensor  # (B, m, H) inner(h_k): the inputs they became; messages are outer(embeds)
    cache: KVPrefix | None = None  # with keep_cache: the prefix, the prompt and all m thought positions


def latent_rollout(backbone: Backbone, inner: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                   steps: int, *, use_cache: bool = True, grad_steps: int | None = None,
                   prefix: KVPrefix | None = None, keep_cache: bool = False) -> Thoughts:
    """Think for ``steps`` latent steps from prompt ``embeds`` (B, L, H) with ``mask`` (B, L).

    Under autograd, ``grad_steps`` keeps only the first that many backbone forwards in the graph (the
    prefill is the first); later states still pass through the inner link with gradients, but nothing
    flows back from them into the backbone. ``None`` keeps every step.

    With ``prefix`` the prompt continues it: its positions come after ``prefix.next_position`` and attend to
    the prefix's real positions. ``keep_cache=True`` returns the prefix, the prompt and every thought as
    ``Thoughts.cache``; the last thought is an input only there, so that costs one more single-position forward.
    """
    batch, _, width = embeds.shape
    # Where the inner link computes: under a device map the last layer may run on another device than the
    # embeddings, beside which the link sits.
    to_link = {"device": embeds.device, "dtype": embeds.dtype, **placement(inner)}
    if steps == 0:
        empty = embeds.new_zeros(batch, 0, width)
        cache = prefill(backbone, embeds, mask, prefix) if keep_cache else None
        return Thoughts(hidden=empty, embeds=empty.to(**to_link), cache=cache)

    def graph_kept(forward_index: int):
        return torch.set_grad_enabled(torch.is_grad_enabled() and (grad_steps is None or forward_index < grad_steps))

    # Under autograd the cache is one whose in-place state updates cannot clobber saved tensors (hybrid
    # models); it stays that way through steps past grad_steps, which would otherwise overwrite states saved before.
    forward = Forward(backbone, prefix, keep=use_cache)
    new_input, new_mask, hidden, thoughts = embeds, mask, [], []
    for step in range(steps):
        with graph_kept(step):
            h = forward(new_mask, embeds=new_input).hidden[:, -1]  # (B, H)
        e = inner(h.to(**to_link))  # (B, H), on the link's device, in its dtype
        hidden.append(h)
        thoughts.append(e)
        if step == steps - 1 and not keep_cache:
            break
        e_in, one = e.to(embeds.dtype)[:, None], mask.new_ones(batch, 1)  # (B, 1, H), (B, 1)
        if use_cache:
            new_input, new_mask = e_in, one
        else:
            new_input, new_mask = torch.cat([new_input, e_in], dim=1), torch.cat([new_mask, one], dim=1)
    cache = None
    if keep_cache:  # the last thought goes in as an input too, as every earlier one did
        with graph_kept(steps):
            if use_cache:
                forward(new_mask, embeds=new_input)
                cache = forward.kv_prefix()
            else:
                cache = prefill(backbone, new_input, new_mask, prefix)
    return Thoughts(hidden=torch.stack(hidden, dim=1), embeds=torch.stack(thoughts, dim=1), cache=cache)


def check_thoughts(agent: str, thoughts: Thoughts, round_: int) -> None:
    """Name what made an agent's thoughts non-finite: its backbone (the first state, before any inner link
    ran, is already bad), its inner link (finite state in, NaN/inf out), or an overflow during the rollout."""
    if torch.isfinite(thoughts.hidden).all() and torch.isfinite(thoughts.embeds).all():
        return
    where = f"agent '{agent}' produced non-finite latents (NaN/inf) in round {round_}"
    if not torch.isfinite(thoughts.hidden[:, :1]).all():
        raise InputError(f"{where}: its backbone's hidden state at the end of the prompt is already non-finite; "
                         "check the backbone's dtype (fp16 overflows; use bf16 or fp32) and weights")
    if not torch.isfinite(thoughts.embeds[:, :1]).all():
        raise InputError(f"{where}: its inner link turned finite hidden states into NaN/inf; its weights hold "
                         "NaN/inf or overflow: reload them from a good checkpoint, or retrain the link")
    raise InputError(f"{where}: the backbone overflowed during the rollout; check the backbone's dtype "
                     "(fp16 overflows; use bf16 or fp32) and the inner link's weights")
