"""One backbone forward for thinking, speaking and training, and KV prefixes: caches a receiver continues.

:class:`Forward` runs a backbone over a batch of sequences that grow: an optional :class:`KVPrefix`, then the
positions each call adds. Latent rollouts, decoding, teacher forcing and the closed-form fits all go through
it, so positions, masks and caches are handled in one place. A row's positions come from its masks: the
prefix's ``next_position``, then one more per real new position (left padding shifts nothing).

A :class:`KVPrefix` is what a KV-cache edge carries: the keys and values of a sender's prompt and latent
thoughts, with their mask and the position the next real position takes. A receiver whose prompt continues
it attends to those positions as if it had read them itself; its own positions come after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import GraphError
from .backbone import Backbone, cache_kwargs

# The config fields that must agree for one backbone's keys and values to be read by another.
_KV_SHAPE_FIELDS = ("model_type", "num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size")


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: left padding does not shift them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)


@dataclass(frozen=True)
class KVPrefix:
    """The keys and values of positions a backbone has read, for a later forward to continue.

    Never written in place: a receiver continues a fresh cache built from it (:meth:`new_cache`), so several
    receivers may read one prefix. Under autograd its tensors keep their graph, so a loss on a receiver reaches
    whatever made the sender's positions (its inner link).
    """

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: keys, values (B, kv_heads, P, head_dim)
    mask: torch.Tensor  # (B, P) long: 1 for real positions, 0 for padding (left, or in the middle after concat)
    next_position: torch.Tensor  # (B,) long: the position id of each row's next real position

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def _map(self, along_sequence, per_row=lambda t: t) -> KVPrefix:
        """The prefix with ``along_sequence`` applied to the keys, values and mask (the sequence is their
        second-to-last axis, the mask's last) and ``per_row`` to ``next_position``."""
        return KVPrefix(layers=tuple((along_sequence(k), along_sequence(v)) for k, v in self.layers),
                        mask=along_sequence(self.mask), next_position=per_row(self.next_position))

    def to(self, device: torch.device | str) -> KVPrefix:
        return self._map(lambda t: t.to(device), lambda t: t.to(device))

    def thoughts_only(self, steps: int) -> KVPrefix:
        """Only the last ``steps`` positions (a sender's thoughts). ``next_position`` is unchanged, so a
        receiver's positions still come after the sender's whole sequence, as in the full prefix."""
        if not 0 < steps <= self.length:
            raise GraphError(f"thoughts_only({steps}) on a KV prefix of {self.length} positions; keep between 1 and "
                             f"{self.length} positions")
        return self._map(lambda t: t[..., -steps:, :] if t.dim() == 4 else t[:, -steps:])

    def select(self, rows: Sequence[int]) -> KVPrefix:
        """The prefix of the given rows only, in that order (rows that take different routes)."""
        index = torch.tensor(list(rows), dtype=torch.long)

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.index_select(0, index.to(tensor.device))

        return self._map(pick, pick)

    def spread(self, rows: Sequence[int], batch: int) -> KVPrefix:
        """This prefix of a sub-batch placed at ``rows`` of a batch of ``batch`` rows; the other rows hold no
        position (masked, next position 0), as if a receiver continued nothing there."""
        index = torch.tensor(list(rows), dtype=torch.long)

        def place(tensor: torch.Tensor) -> torch.Tensor:
            full = tensor.new_zeros((batch, *tensor.shape[1:]))
            return full.index_copy(0, index.to(tensor.device), tensor)

        return self._map(place, place)

    @staticmethod
    def concat(parts: Sequence[KVPrefix]) -> KVPrefix:
        """The parts laid end to end along the sequence, in order.

        Each part keeps the positions it was computed at (every part starts at its own 0), and the next
        position is the sum of the parts' next positions: a receiver's positions come after all of them, as
        if it had read the parts one after another.
        """
        if not parts:
            raise GraphError("KVPrefix.concat needs at least one prefix; pass the prefixes to lay end to end")
        if len({len(p.layers) for p in parts}) > 1:
            raise GraphError("these KV prefixes come from backbones with different numbers of layers; concatenate "
                             "prefixes of one architecture only")
        layers = tuple((torch.cat([p.layers[i][0] for p in parts], dim=-2),
                        torch.cat([p.layers[i][1] for p in parts], dim=-2)) for i in range(len(parts[0].layers)))
        return KVPrefix(layers=layers, mask=torch.cat([p.mask for p in parts], dim=1),
                        next_position=torch.stack([p.next_position for p in parts]).sum(0))

    def new_cache(self, backbone: Backbone) -> Any:
        """A cache for ``backbone`` that holds this prefix. Its layers grow by ``torch.cat`` into new tensors,
        so continuing it never writes into this prefix's tensors."""
        cache = backbone.new_cache(autograd=torch.is_grad_enabled())
        for index, (keys, values) in enumerate(self.layers):
            cache.update(keys, values, index)
        return cache

    @classmethod
    def of_cache(cls, cache: Any, mask: torch.Tensor, next_position: torch.Tensor) -> KVPrefix:
        """The prefix a filled cache holds (every layer a plain full-attention layer: see :func:`kv_problem`)."""
        layers = getattr(cache, "layers", None)  # a hybrid model's own cache class (transformers < 5.5) has none
        if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers}) if layers is not None else [type(cache).__name__]
            raise GraphError(f"this backbone's cache has {', '.join(kinds)} layers, which cannot be continued as a KV "
                             "prefix (only full attention on every layer can); use a latent edge instead")
        return cls(layers=tuple((layer.keys, layer.values) for layer in layers), mask=mask, next_position=next_position)


@dataclass
class Output:
    """What one forward gives for its new positions."""

    hidden: torch.Tensor | None  # (B, n, H) last-layer states; None when only logits were asked for
    logits: torch.Tensor | None  # (B, k, V) for the last k = logits_to_keep positions; None when not asked for


class Forward:
    """The forwards of one backbone over one batch of sequences: an optional prefix, then each call's positions.

    ``keep=True``: each call appends its positions to a KV cache, and the next call continues after them
    (rollouts, decoding). ``keep=False``: each call is a whole forward over the prefix and its own positions,
    and nothing is kept (teacher forcing, calibration, the re-encoding reference). Under autograd the cache is
    one whose updates cannot clobber tensors the backward pass needs (:meth:`Backbone.new_cache`).
    """

    def __init__(self, backbone: Backbone, prefix: KVPrefix | None = None, *, keep: bool = True):
        self.backbone, self.prefix, self.keep = backbone, prefix, keep
        self.cache = None
        if keep:
            self.cache = prefix.new_cache(backbone) if prefix else backbone.new_cache(autograd=torch.is_grad_enabled())
        self.mask = prefix.mask if prefix else None  # (B, P): every position the cache holds
        self.next_position = prefix.next_position if prefix else None  # (B,)

    def __call__(self, mask: torch.Tensor, *, embeds: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 logits_to_keep: int | None = None, hidden: bool = True) -> Output:
        """Forward the new positions, given as ``embeds`` (B, n, H) or ``ids`` (B, n), with ``mask`` (B, n).

        ``logits_to_keep=None`` runs the decoder and gives the hidden states only; an int runs the LM head on
        that many last positions too (then ``hidden=False`` skips collecting the hidden states).
        """
        seen = self.mask
        start = self.next_position
        positions = positions_from_mask(mask) + (0 if start is None else start[:, None])
        full_mask = mask if seen is None else torch.cat([seen, mask], dim=1)
        cache = self.cache if self.keep else (self.prefix.new_cache(self.backbone) if self.prefix else None)
        inputs = {"inputs_embeds": embeds} if ids is None else {"input_ids": ids}
        if logits_to_keep is None:
            module, head = self.backbone.decoder, {}
        else:
            module, head = self.backbone.model, {"logits_to_keep": logits_to_keep}
            if hidden:
                head["output_hidden_states"] = True
        out = module(**inputs, attention_mask=full_mask, position_ids=positions, use_cache=cache is not None,
                     **head, **cache_kwargs(module, cache))
        if self.keep:
            self.mask = full_mask
            self.next_position = mask.sum(-1) + (0 if start is None else start)
        if logits_to_keep is None:
            return Output(hidden=out.last_hidden_state, logits=None)
        return Output(hidden=out.hidden_states[-1] if hidden else None, logits=out.logits)

    def kv_prefix(self) -> KVPrefix:
        """Everything this forward has read so far (the prefix and every call's positions), as a prefix."""
        if not self.keep:
            raise GraphError("a Forward made with keep=False keeps no cache; make it with keep=True to read its prefix")
        return KVPrefix.of_cache(self.cache, self.mask, self.next_position)


def prefill(backbone: Backbone, embeds: torch.Tensor, mask: torch.Tensor, prefix: KVPrefix | None = None) -> KVPrefix:
    """The prefix of one forward over ``embeds`` (B, L, H) with ``mask`` (B, L), continuing ``prefix`` if given.

    Under autograd the keys and values keep their graph (a sender's teacher-forced cache in training).
    """
    forward = Forward(backbone, prefix)
    forward(mask, embeds=embeds)
    return forward.kv_prefix()


def kv_problem(sender: Backbone, receiver: Backbone) -> str | None:
    """Why ``receiver`` cannot continue ``sender``'s KV cache, or None when it can. Reads configs only."""
    for backbone in (sender, receiver):
        if (layout := _cache_layout_problem(backbone)) is not None:
            return layout
        if backbone.device_map is not None:  # its layers' caches would live on several devices
            return (f"backbone {backbone.name_or_path!r} is spread by a device map ({backbone.device_map}), and a KV "
                    "cache passed between agents is only supported on a backbone placed on one device (device=); "
                    "place it on one device, or use a latent edge")
    if sender is receiver:
        return None
    ours, theirs = sender.config.get_text_config(), receiver.config.get_text_config()
    differ = [f"{name} {_field(ours, name)} against {_field(theirs, name)}" for name in _KV_SHAPE_FIELDS
              if _field(ours, name) != _field(theirs, name)]
    if sender.dtype != receiver.dtype:
        differ.append(f"dtype {sender.dtype} against {receiver.dtype}")
    if differ:
        return (f"the sender's backbone {sender.name_or_path!r} and the receiver's {receiver.name_or_path!r} differ in "
                f"{'; '.join(differ)}, so the receiver cannot read the sender's keys and values")
    return None


def _field(config: Any, name: str) -> Any:
    if name == "head_dim" and getattr(config, "head_dim", None) is None:
        return config.hidden_size // config.num_attention_heads
    return getattr(config, name, None)


def _cache_layout_problem(backbone: Backbone) -> str | None:
    """A sentence when the backbone's cache is not full attention on every layer (the same reading of the
    config as transformers' own cache: ``layer_types``, else ``sliding_window`` or ``attention_chunk_size``)."""
    config = backbone.config.get_text_config()
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
        kinds = ["sliding_attention" if window is not None else "full_attention"]
    other = sorted(set(kinds) - {"full_attention"})
    if not other:
        return None
    return (f"backbone {backbone.name_or_path!r} has {', '.join(other)} layers, whose cache cannot be continued "
            "by another agent (only full attention on every layer can be concatenated); use a latent edge")
