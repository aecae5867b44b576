"""The ``link_dtype`` option of the loaders: the dtype loaded links hold their parameters and compute in.

A link computes in the dtype of its parameters: its input is cast to that dtype, and its output to the
receiving backbone's (:func:`~latentgraph.core.links.placement`), so the option decides the numerics of
every message. ``"float32"``, the default, keeps links in fp32 whatever the backbones run in: the published
bf16 values load exactly (bf16 to fp32 is exact) and are then applied without bf16 rounding. ``"auto"`` keeps
each link in the dtype its file holds, as the published RecursiveMAS code does (bf16 for every released
``.pt``), to reproduce the published numerics. Any floating-point dtype, or its name, is taken as given.

The option is a load-time choice, never stored in a config: ``links.safetensors`` holds each link's tensors in
the dtype it had when saved, which is what ``"auto"`` reads back.
"""

from __future__ import annotations

from functools import reduce
from typing import Literal

import torch
from torch import nn

from ..errors import InputError

AUTO = "auto"
DEFAULT = torch.float32  # what the public loaders' link_dtype="float32" resolves to

LinkDtype = torch.dtype | Literal["auto"]
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float8 has no matmul or norm


def check_link_dtype(value: torch.dtype | str) -> LinkDtype:
    """``"auto"``, or the floating-point dtype ``value`` is or names; anything else is an :class:`InputError`."""
    if isinstance(value, str) and value == AUTO:
        return AUTO
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if dtype not in COMPUTE_DTYPES:
        raise InputError(f"link_dtype must be 'auto' (each link in the dtype its file holds, as published) or a "
                         f"dtype links compute in: 'float32' (the default), 'bfloat16', 'float16' or 'float64' "
                         f"(or the torch dtype); got {value!r}")
    return dtype


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype a link's tensors are stored in (the widest, should they differ); ``None`` for no tensors."""
    dtypes = [tensor.dtype for tensor in state.values() if tensor.is_floating_point()]
    return reduce(torch.promote_types, dtypes) if dtypes else None


def cast_links(modules: dict[str, nn.Module], link_dtype: LinkDtype) -> None:
    """Put freshly built links in ``link_dtype``; with ``"auto"`` they stay as built (fp32): no file says more."""
    if link_dtype != AUTO:
        for module in modules.values():
            module.to(link_dtype)


def load_link_state(module: nn.Module, state: dict[str, torch.Tensor], link_dtype: LinkDtype, *,
                    strict: bool = True) -> None:
    """Copy ``state`` into ``module`` after putting it in ``link_dtype`` (with ``"auto"``: the dtype of the
    tensors in ``state``), so each value is rounded at most once, from the file's dtype to the link's."""
    dtype = stored_dtype(state) if link_dtype == AUTO else link_dtype
    if dtype is not None:
        module.to(dtype)
    module.load_state_dict(state, strict=strict)
