"""Backbones: frozen Hugging Face causal LMs, loaded once and shared by every agent that names them.

A backbone is given as a hub id, a local directory or a loaded model. Its config is read at once (so a
graph can be validated and rendered without weights); the weights load on first use. Code from the model's
repository never runs (:mod:`~latentgraph.core.repository_code`). Backbones are frozen:
eval mode, no gradients. It runs on one device, or is spread over several by a device map
(:mod:`~latentgraph.core.devices`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import pickle
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from ..errors import CheckpointError, GraphError, InputError, unpickling_problem
from ..files.hub import fetch, local_folder, missing_repo_message, plain_view
from .devices import DeviceMap, check_modules, device_map_from, devices, execution_device, resolve_device, resolve_dtype
from .repository_code import config_problem, model_problem, tokenizer_problem

logger = logging.getLogger(__name__)

_SHARED: weakref.WeakValueDictionary[tuple, Backbone] = weakref.WeakValueDictionary()


class Backbone:
    """A frozen causal LM with its tokenizer. Use :func:`get_backbone` to share loaded copies."""

    def __init__(self, source: str, *, revision: str | None = None, device: torch.device | None,
                 dtype: torch.dtype, model: PreTrainedModel | None = None, tokenizer: Any = None,
                 device_map: DeviceMap | None = None):
        self.name_or_path = source
        self.revision = revision
        self.device_map = device_map
        self._device = device  # None: a device map, or a loaded model, decides (see ``device``)
        self.dtype = dtype
        self._model = model
        self._tokenizer = tokenizer
        self.config = model.config if model is not None else self._read_config()

    def _read_config(self) -> Any:
        # trust_remote_code=False here and in every loader below: never a prompt, never the repository's code
        try:
            return AutoConfig.from_pretrained(self.name_or_path, revision=self.revision, trust_remote_code=False)
        except ValueError as e:
            raise CheckpointError(config_problem(self.name_or_path, self.revision, e)) from None

    def __repr__(self) -> str:
        state = "loaded" if self._model is not None else "not loaded"
        where = self.device if self._device is not None or self.loaded else self.device_map
        return f"Backbone({self.name_or_path!r}, hidden={self.hidden_size}, {self.dtype}, {where}, {state})"

    @property
    def device(self) -> torch.device:
        """Where the input embeddings execute. Prompts are assembled there, and the inner link, the incoming
        outer links and the sampling generator sit there. With a device map this is accelerate's execution
        device of the embeddings (their weights may be offloaded), known once the weights are loaded: reading
        it loads them."""
        return self._device if self._device is not None else execution_device(self.model)

    @property
    def devices(self) -> frozenset[torch.device]:
        """Every device the backbone's layers run on (several only under a device map); agents whose
        backbones share none of them can run at once."""
        return frozenset({self._device}) if self._device is not None else devices(self.model)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            logger.info("loading backbone %s", self.name_or_path)
            directory = plain_view(fetch(self.name_or_path, revision=self.revision, ignore=["*.pt", "*.pth"]))
            kwargs = {"dtype": self.dtype}
            if self.device_map is not None:
                kwargs.update(self.device_map.kwargs())
            elif self._device.type != "cpu":
                kwargs["device_map"] = str(self._device)
            try:
                model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False, **kwargs)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"backbone {self.name_or_path!r}: {unpickling_problem(e)}; convert its "
                                      ".bin weights to safetensors, or use a checkpoint you trust") from None
            except ValueError as e:
                if (problem := model_problem(self.name_or_path, self.config)) is not None:
                    raise CheckpointError(problem) from None
                if self.device_map is None:
                    raise
                # transformers and accelerate reject a map or limits they cannot meet
                raise InputError(f"backbone {self.name_or_path!r} could not be placed with {self.device_map}: {e}; "
                                 "change device_map, max_memory or offload_folder") from None
            if self.device_map is not None:
                check_modules(model, self.device_map, self.name_or_path)
            self._model = _freeze(model)
        return self._model

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, revision=self.revision,
                                                                trust_remote_code=False)
            except ValueError as e:
                raise CheckpointError(tokenizer_problem(self.name_or_path, self.revision, self.config, e)) from None
        return self._tokenizer

    def load(self) -> Backbone:
        """Load the weights and the tokenizer now rather than on first use (e.g. before timing a run)."""
        if self.model is None or self.tokenizer is None:
            raise CheckpointError(f"backbone {self.name_or_path!r} did not load")
        return self

    @property
    def hidden_size(self) -> int:
        """Width of the input embeddings (composite configs such as Gemma 3 have no top-level hidden_size)."""
        if self._model is not None:
            return self._model.get_input_embeddings().weight.shape[1]
        return self.config.get_text_config().hidden_size

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config.get_text_config(), "max_position_embeddings", None)

    @functools.cached_property
    def longest_token(self) -> int | None:
        """The characters of the longest entry of the tokenizer's vocabulary (None when it lists none).

        No token stands for more characters of a text than its entry has (a byte-level entry has one character
        per byte, a SentencePiece entry one per character), so a text of ``c`` characters has at least
        ``c / longest_token`` tokens: a bound that refuses a text too long for the context before tokenizing it.
        """
        vocabulary = getattr(self.tokenizer, "get_vocab", None)
        entries = vocabulary() if callable(vocabulary) else None
        return max(map(len, entries), default=None) if entries else None

    @property
    def decoder(self) -> torch.nn.Module:
        """The transformer without its LM head: latent rollouts need hidden states, not logits."""
        return self.model.get_decoder()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Through the embedding module, never weight[ids]: Gemma scales inside it.
        return self.model.get_input_embeddings()(input_ids)

    def new_cache(self, *, autograd: bool = False) -> Any:
        """A KV cache for this backbone, built from the config so hybrid models (Qwen3.5 linear attention)
        get their recurrent layers. ``autograd=True`` gives an :class:`AutogradCache`, for forwards whose
        gradients will be taken; the default cache updates states in place, which is faster. A model that
        defines its own cache class gets that one, under autograd too (see :func:`own_cache_class`)."""
        own = own_cache_class(type(self.model))
        if own is not None:
            return own(config=self.model.config)
        return (AutogradCache if autograd else DynamicCache)(config=self.model.config)


class AutogradCache(DynamicCache):
    """A ``DynamicCache`` that never overwrites a state tensor autograd may have saved.

    Linear-attention layers (Qwen3.5's Gated DeltaNet) keep a conv and a recurrent state per layer and
    update them in place: ``copy_`` into the cached tensor, in the cache's ``update_*_state`` and in the
    fused single-token conv update, which writes the tensor ``get_conv_state`` returned. Under autograd
    the step that read a state saved it for its backward pass, so the in-place write makes ``backward()``
    fail ("modified by an inplace operation"). Here every read and every update of a state first swaps
    the cached tensor for a copy of itself, so the in-place write lands on a tensor no earlier operation
    saved; the values, and so the gradients, are those of the plain cache (before transformers 5.21 models
    read the states directly, and only updates swap them, which suffices there). Key/value layers already grow
    out of place (``torch.cat``); their updates run with gradients on, so they keep the graph of earlier
    positions even when the forward that appends runs without. The copies are per layer state (small: no sequence
    axis), made only by this class, which rollouts use only when gradients are on.
    """

    def _fresh(self, kind: str, layer_idx: int, state_idx: int) -> None:
        layer = self.layers[layer_idx]
        states = getattr(layer, kind, None)  # absent on attention layers: the base raises
        if isinstance(states, torch.Tensor):  # transformers 5.5 to 5.13: one state per layer, no state_idx
            setattr(layer, kind, states.clone())
        elif isinstance(states, dict) and isinstance(states.get(state_idx), torch.Tensor):
            states[state_idx] = states[state_idx].clone()

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        self._fresh("conv_states", layer_idx, state_idx)
        return super().get_conv_state(layer_idx, state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        self._fresh("recurrent_states", layer_idx, state_idx)
        return super().get_recurrent_state(layer_idx, state_idx)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # A rollout may run its later forwards without gradients (grad_steps). The keys and values they append
        # carry no graph, but the layer grown from them (torch.cat) must keep the graph of the earlier positions:
        # a KV prefix hands it to a receiver, whose loss then reaches the sender.
        with torch.enable_grad():
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # ``state_idx`` is passed on only when the caller gives it: before transformers 5.14 the base takes none.
    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, **kwargs) -> torch.Tensor:
        self._fresh("conv_states", layer_idx, kwargs.get("state_idx", 0))
        return super().update_conv_state(conv_states, layer_idx, **kwargs)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, **kwargs) -> torch.Tensor:
        self._fresh("recurrent_states", layer_idx, kwargs.get("state_idx", 0))
        return super().update_recurrent_state(recurrent_states, layer_idx, **kwargs)


def cache_kwargs(module: torch.nn.Module, cache: DynamicCache | None) -> dict[str, DynamicCache | None]:
    """The keyword that hands ``module.forward`` its KV cache: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` warns, and goes in 5.40), ``past_key_values`` before."""
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@functools.cache
def own_cache_class(model_class: type) -> type | None:
    """The cache class a model's modeling module defines for the model, or None where ``DynamicCache`` serves.

    Before transformers 5.5, ``DynamicCache`` held key/value layers only, and a hybrid model (Qwen3.5 in
    5.2 to 5.4) kept its linear-attention states in a ``<Model>DynamicCache`` of its own, which its forward
    builds when given no cache and expects when given one. That cache replaces its recurrent states and
    writes its conv state in place only where no saved tensor holds it, so it also serves under autograd
    (the hybrid rollout tests check its gradients). From 5.5 on, ``DynamicCache(config=...)`` holds those
    states and no hybrid model defines such a class.
    """
    module = sys.modules[model_class.__module__]
    return next((obj for name, obj in vars(module).items()
                 if name.endswith("DynamicCache") and isinstance(obj, type) and obj.__module__ == module.__name__
                 and "config" in inspect.signature(obj).parameters), None)


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def get_backbone(backbone: str | Path | PreTrainedModel | Backbone, *, tokenizer: Any = None,
                 revision: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
                 max_memory: dict | None = None, offload_folder: str | Path | None = None) -> Backbone:
    """Return the shared :class:`Backbone` for a hub id, local directory or loaded model.

    Agents that name the same source (and revision, device or device map, dtype) get the same object, so
    the weights are loaded once; other placements load another copy. A loaded model is used as it is
    (never copied): it is frozen in place and moved only when ``device`` or ``dtype`` is given. See
    :class:`~latentgraph.Agent` for ``device_map``, ``max_memory`` and ``offload_folder``.
    """
    if isinstance(backbone, Backbone):
        return backbone
    if isinstance(backbone, PreTrainedModel):
        if device_map is not None or max_memory is not None or offload_folder is not None:
            raise InputError("device_map, max_memory and offload_folder place a backbone as it loads, but this one "
                             "was given loaded: load it with from_pretrained(..., device_map=...) yourself, or "
                             "pass its hub id or directory")
        key: tuple = ("model", id(backbone), id(tokenizer))
        wanted_device = resolve_device(device) if device is not None else None
        wanted_dtype = resolve_dtype(dtype, wanted_device or backbone.device) if dtype is not None else None
        if (shared := _SHARED.get(key)) is not None:
            _check_shared(shared, wanted_device, wanted_dtype)
            return shared
        if wanted_device is not None or wanted_dtype is not None:
            backbone.to(device=wanted_device, dtype=wanted_dtype)
        source = backbone.config.name_or_path or type(backbone).__name__
        if tokenizer is None:
            raise CheckpointError(f"backbone {source!r} was given as a loaded model; pass its tokenizer= too")
        # no fixed device: read from the model, which a device map may have spread
        made = Backbone(source, device=None, dtype=backbone.dtype, model=_freeze(backbone), tokenizer=tokenizer)
    elif isinstance(backbone, (str, Path)):
        spread = device_map_from(device, device_map, max_memory, offload_folder)
        resolved_device = resolve_device(device) if spread is None else None
        resolved_dtype = resolve_dtype(dtype, resolved_device or spread.main_device())
        folder = local_folder(backbone, what="backbone directory")  # None: a hub id
        source = str(folder) if folder is not None else str(backbone)
        key = ("source", source, revision, str(resolved_device), resolved_dtype, spread and spread.key())
        if (shared := _SHARED.get(key)) is not None:
            return shared
        try:
            made = Backbone(source, revision=revision, device=resolved_device, dtype=resolved_dtype,
                            tokenizer=tokenizer, device_map=spread)
        except OSError as e:
            if folder is None:
                raise CheckpointError(missing_repo_message(source, revision, e)) from None
            raise CheckpointError(f"backbone directory {source!r} could not be read: {e}; pass the folder the model's "
                                  "save_pretrained wrote, a hub id, or a loaded model") from None
    else:
        raise GraphError(f"a backbone is a hub id, a local directory or a loaded model, got {backbone!r:.80}")
    _SHARED[key] = made
    return made


def _check_shared(shared: Backbone, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """A loaded model is one object: a second agent cannot have it on another device or in another dtype."""
    if device is not None and device != shared.device:
        raise GraphError(f"backbone {shared.name_or_path!r} is already placed on {shared.device} for another "
                         f"agent, which shares its weights; it cannot also be on {device}: pass the same device, "
                         "or load a second copy of the model")
    if dtype is not None and dtype != shared.dtype:
        raise GraphError(f"backbone {shared.name_or_path!r} is already in {shared.dtype} for another agent, which "
                         f"shares its weights; it cannot also be in {dtype}: pass the same dtype, or load a "
                         "second copy of the model")
