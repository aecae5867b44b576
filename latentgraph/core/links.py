"""RecursiveLinks: the small trainable modules of a system.

An *inner* link belongs to an agent: it maps the backbone's last-layer hidden state back into the same
backbone's input-embedding space, so the agent can feed a thought back in as its next input. An *outer*
link sits on an edge: it maps the sender's latent thoughts (after the sender's inner link) into the
receiver's input-embedding space.

Links are plain ``nn.Module``s built from a :class:`LinkConfig`. Its ``type`` tag picks the class from a
registry that users extend with :func:`register_link`; each type has its own config class declaring its
hyperparameters (``LnResConfig``, ``MLPConfig``, ...), so a misspelt field is an error, and says through
:meth:`Link.fit_affine` whether closed-form initialisation can write it. The default type ``ln_res`` is the
published RecursiveMAS link, with the published parameter names, so released checkpoints load unchanged.
The other built-in types are the plain variants of the paper's link ablation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import GraphError
from .config import LINK_CONFIGS, LinkConfig, Role, parse_link_config, within
from .limits import LINK_PARAMETERS, LINK_WIDTH

Width = Annotated[int | None, Field(ge=1), within(LINK_WIDTH)]  # a hidden layer's width; None: the type's default


class LnResConfig(LinkConfig):
    """Config of the published ``ln_res`` links; ``hidden_dim`` is the width of the MLP branch (default
    ``H`` for inner links, ``2 * out_dim`` for outer links)."""

    type: Literal["ln_res"] = "ln_res"
    hidden_dim: Width = None


class LinearConfig(LinkConfig):
    """Config of ``linear`` links (no hyperparameters)."""

    type: Literal["linear"] = "linear"


class ResLinearConfig(LinkConfig):
    """Config of ``res_linear`` links (no hyperparameters)."""

    type: Literal["res_linear"] = "res_linear"


class MLPConfig(LinkConfig):
    """Config of ``mlp`` links; ``hidden_dim`` defaults to ``out_dim``."""

    type: Literal["mlp"] = "mlp"
    hidden_dim: Width = None


class ResMLPConfig(MLPConfig):
    """Config of ``res_mlp`` links; ``hidden_dim`` defaults to ``out_dim``."""

    type: Literal["res_mlp"] = "res_mlp"


class Link(nn.Module):
    """Base class of links: maps ``(..., in_dim)`` to ``(..., out_dim)``.

    A link type that can hold an affine map ``y = x @ W + b`` overrides :meth:`fit_affine`, and closed-form
    initialisation (:mod:`latentgraph.training.closed_form`) then works for it.
    """

    def __init__(self, config: LinkConfig):
        super().__init__()
        self.config = config

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fit_affine(self, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                   targets: torch.Tensor | None = None) -> None:
        """Set the parameters so that the link computes (or best approximates) ``x @ weight + bias``.

        Args:
            weight: ``(in_dim, out_dim)``; bias: ``(out_dim,)``.
            x: ``(N, in_dim)`` sample inputs, for types that can only approximate the map.
            targets: ``(N, out_dim)`` what the outputs on ``x`` should be, when known (else the map's).

        The base class cannot: it raises :class:`~latentgraph.GraphError`.
        """
        raise GraphError(f"a {self.config.type!r} link cannot be fitted in closed form (its class does not "
                         "implement Link.fit_affine); train it instead")

    def extra_repr(self) -> str:
        return f"type={self.config.type!r}, role={self.config.role!r}, {self.config.in_dim} -> {self.config.out_dim}"


_REGISTRY: dict[tuple[str, Role], type[Link]] = {}


def register_link(name: str, *, role: Role | None = None,
                  config: type[LinkConfig] | None = None) -> Callable[[type[Link]], type[Link]]:
    """Class decorator that registers a :class:`Link` subclass under a type name.

    Args:
        name: the ``type`` tag users pass as ``inner_link=`` or ``connect(..., link=)``.
        role: ``"inner"`` or ``"outer"`` to register for one role only; by default both.
        config: the type's config class, a :class:`LinkConfig` subclass declaring its hyperparameters
            (``type`` is filled in). Without one the type takes no hyperparameter: any field but ``type``
            is an error.

    Example:
        >>> class ScaledConfig(LinkConfig):
        ...     init_scale: float = 1.0
        >>> @register_link("scaled_identity", config=ScaledConfig)
        ... class ScaledIdentity(Link):
        ...     def __init__(self, config):
        ...         super().__init__(config)
        ...         self.scale = nn.Parameter(torch.full((), config.init_scale))
        ...     def forward(self, x):
        ...         return self.scale * x
    """
    if config is not None and not (isinstance(config, type) and issubclass(config, LinkConfig)):
        raise GraphError(f"register_link({name!r}, config=...) takes a LinkConfig subclass, got {config!r}")

    def decorator(cls: type[Link]) -> type[Link]:
        if not (isinstance(cls, type) and issubclass(cls, Link)):
            raise GraphError(f"register_link({name!r}) decorates Link subclasses, got {cls!r}")
        for r in (role,) if role else ("inner", "outer"):
            _REGISTRY[(name, r)] = cls
        if config is not None or name not in LINK_CONFIGS:
            LINK_CONFIGS[name] = config or LinkConfig
        return cls

    return decorator


def link_types(role: Role | None = None) -> list[str]:
    """The registered link type names (for one role, or for any role)."""
    return sorted({name for name, r in _REGISTRY if role in (None, r)})


def make_link(spec: Any, *, role: Role, in_dim: int, out_dim: int, where: str) -> nn.Module:
    """Build or check a link for ``where`` (an agent or an edge, named in errors).

    ``spec`` is a registered type name, a :class:`LinkConfig` or a dict of its fields, or a module. A
    module that is not a :class:`Link` is checked by running it once on zeros.
    """
    if isinstance(spec, nn.Module):
        check_link(spec, role=role, in_dim=in_dim, out_dim=out_dim, where=where)
        return spec
    name = spec if isinstance(spec, str) else spec.type if isinstance(spec, LinkConfig) else (
        spec.get("type", "ln_res") if isinstance(spec, dict) else None)
    if isinstance(name, str):
        _check_type(name, role, where)
    config = parse_link_config(spec, where)
    placed = {"role": role, "in_dim": in_dim, "out_dim": out_dim}
    config = config.model_copy(update={k: v for k, v in placed.items() if getattr(config, k) is None})
    check_config(config, role=role, in_dim=in_dim, out_dim=out_dim, where=where)
    cls = _REGISTRY[(config.type, role)]
    _check_size(cls, config, where)
    try:
        return cls(config)
    except ValueError as e:
        raise GraphError(f"{where}: {e}") from None


def _check_size(cls: type[Link], config: LinkConfig, where: str) -> None:
    """Refuse a link with more parameters than :data:`~latentgraph.core.limits.LINK_PARAMETERS` allows, counted
    on the meta device (shapes, no memory), so an absurd size fails here instead of allocating."""
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in cls(config).parameters())
    except Exception:  # built for real instead: that reports a config the type refuses (a ValueError), and
        return  # runs a user type whose __init__ reads tensor values, which the meta device cannot
    if problem := LINK_PARAMETERS.problem(size, f"this {config.type!r} link ({config.in_dim} -> {config.out_dim}) "
                                                f"of {size:,} parameters"):
        raise GraphError(f"{where}: {problem}")


def config_of(link: nn.Module, where: str) -> LinkConfig:
    """The config that rebuilds ``link`` (without role and dims, as a file stores it)."""
    if not isinstance(link, Link):
        raise GraphError(f"{where} is a plain {type(link).__name__}, which a config cannot describe; "
                         "make it a Link subclass registered with @latentgraph.register_link")
    return link.config.without_placement()


def _check_type(name: str, role: Role, where: str) -> None:
    if (name, role) not in _REGISTRY:
        raise GraphError(
            f"{where}: unknown {role} link type {name!r}; registered: {link_types(role)}. "
            "Register your own with @latentgraph.register_link."
        )


def check_config(config: LinkConfig, *, role: Role, in_dim: int, out_dim: int, where: str) -> None:
    _check_type(config.type, role, where)
    if config.role != role:
        raise GraphError(f"{where}: needs an {role} link, got a config for an {config.role} link")
    if (config.in_dim, config.out_dim) != (in_dim, out_dim):
        raise GraphError(
            f"{where}: link dims {config.in_dim} -> {config.out_dim} do not match the backbones "
            f"({in_dim} -> {out_dim}); omit the dims and latentgraph fills them in"
        )


def check_link(link: nn.Module, *, role: Role, in_dim: int, out_dim: int, where: str) -> None:
    """Check a link module against the dims its place in the graph requires."""
    if isinstance(link, Link):
        check_config(link.config, role=role, in_dim=in_dim, out_dim=out_dim, where=where)
        return
    param = next(link.parameters(), None)
    probe = torch.zeros(1, 1, in_dim, device=param.device if param is not None else "cpu",
                        dtype=param.dtype if param is not None else torch.float32)
    try:
        with torch.no_grad():
            shape = tuple(link(probe).shape)
    except Exception as e:  # any failure on a well-shaped input means the module does not fit here
        raise GraphError(f"{where}: the link module fails on an input of shape (1, 1, {in_dim}): {e}") from None
    if shape != (1, 1, out_dim):
        raise GraphError(f"{where}: the link module maps (1, 1, {in_dim}) to {shape}, expected (1, 1, {out_dim})")


def placement(module: nn.Module) -> dict:
    """The device and dtype of a module's parameters (empty for a module without any), to move inputs there."""
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _skip(config: LinkConfig) -> nn.Module:
    """Residual branch: identity when the dims agree, else a learned projection (the paper's W3)."""
    if config.in_dim == config.out_dim:
        return nn.Identity()
    return nn.Linear(config.in_dim, config.out_dim)


def _per_dimension_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``y[:, j] ~ scale[j] * x[:, j] + shift[j]`` for every dimension ``j``."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    scale = (xc * yc).sum(0) / (xc * xc).sum(0).clamp_min(1e-8)
    return scale, y.mean(0) - scale * x.mean(0)


def _fit_final_norm(norm: nn.LayerNorm, before: torch.Tensor, goal: torch.Tensor) -> None:
    """Fit a final LayerNorm's per-dimension scale and shift so that ``norm(before) ~ goal``."""
    normed = F.layer_norm(before, before.shape[-1:], eps=norm.eps)
    scale, shift = _per_dimension_fit(normed, goal)
    norm.weight.copy_(scale)
    norm.bias.copy_(shift)


@register_link("ln_res", role="inner", config=LnResConfig)
class InnerLnResLink(Link):
    """Published inner link: ``y = post_ln(x + proj2(gelu(proj1(pre_ln(x)))))``, all ``H -> H``.

    Fitted in closed form approximately: the MLP branch is zeroed (the residual is the identity) and the
    final LayerNorm's scale and shift are fitted per dimension to the targets.
    """

    def __init__(self, config: LinkConfig):
        super().__init__(config)
        if config.in_dim != config.out_dim:
            raise ValueError(f"an inner ln_res link maps H -> H, got {config.in_dim} -> {config.out_dim}")
        h, hidden = config.in_dim, config.hidden_dim or config.in_dim
        self.pre_ln = nn.LayerNorm(h)
        self.proj1 = nn.Linear(h, hidden)
        self.act = nn.GELU()
        self.proj2 = nn.Linear(hidden, h)
        self.post_ln = nn.LayerNorm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        # The residual adds the raw x, not the normalised one, as in the published weights.
        return self.post_ln(x + self.proj2(self.act(self.proj1(self.pre_ln(x)))))

    @torch.no_grad()
    def fit_affine(self, weight, bias, x, targets=None):
        self.proj2.weight.zero_()
        self.proj2.bias.zero_()
        _fit_final_norm(self.post_ln, x, targets if targets is not None else x @ weight + bias)


@register_link("ln_res", role="outer", config=LnResConfig)
class OuterLnResLink(Link):
    """Published outer link: ``y = ln_target(proj2(gelu(proj1(ln_source(x)))) + residual_proj(x))``,
    with a hidden layer of width ``2 * out_dim``.

    Fitted in closed form approximately: the MLP branch is zeroed, the map goes into ``residual_proj`` and
    the final LayerNorm's scale and shift are fitted per dimension to the targets.
    """

    def __init__(self, config: LinkConfig):
        super().__init__(config)
        d_in, d_out = config.in_dim, config.out_dim
        hidden = config.hidden_dim or 2 * d_out
        self.ln_source = nn.LayerNorm(d_in)
        self.proj1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.proj2 = nn.Linear(hidden, d_out)
        self.residual_proj = nn.Linear(d_in, d_out)
        self.ln_target = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        return self.ln_target(self.proj2(self.act(self.proj1(self.ln_source(x)))) + self.residual_proj(x))

    @torch.no_grad()
    def fit_affine(self, weight, bias, x, targets=None):
        self.proj2.weight.zero_()
        self.proj2.bias.zero_()
        self.residual_proj.weight.copy_(weight.T)
        self.residual_proj.bias.copy_(bias)
        before = x @ weight + bias  # the pre-norm output, (N, d_out)
        _fit_final_norm(self.ln_target, before, targets if targets is not None else before)


@register_link("linear", config=LinearConfig)
class LinearLink(Link):
    """Ablation "1-layer": ``y = proj(x)``; fitted in closed form exactly."""

    def __init__(self, config: LinkConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.in_dim, config.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    @torch.no_grad()
    def fit_affine(self, weight, bias, x, targets=None):
        self.proj.weight.copy_(weight.T)
        self.proj.bias.copy_(bias)


@register_link("res_linear", config=ResLinearConfig)
class ResidualLinearLink(Link):
    """Ablation "res + 1-layer": ``y = skip(x) + proj(x)``; fitted in closed form exactly."""

    def __init__(self, config: LinkConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.in_dim, config.out_dim)
        self.residual_proj = _skip(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual_proj(x) + self.proj(x)

    @torch.no_grad()
    def fit_affine(self, weight, bias, x, targets=None):
        if isinstance(self.residual_proj, nn.Linear):
            self.residual_proj.weight.copy_(weight.T)
            self.residual_proj.bias.copy_(bias)
            self.proj.weight.zero_()
            self.proj.bias.zero_()
        else:  # identity skip: proj holds the rest of the map
            self.proj.weight.copy_(weight.T - torch.eye(len(weight), dtype=weight.dtype, device=weight.device))
            self.proj.bias.copy_(bias)


@register_link("mlp", config=MLPConfig)
class MLPLink(Link):
    """Ablation "2-layer": ``y = proj2(gelu(proj1(x)))``, hidden width ``out_dim`` by default."""

    def __init__(self, config: LinkConfig):
        super().__init__(config)
        hidden = config.hidden_dim or config.out_dim
        self.proj1 = nn.Linear(config.in_dim, hidden)
        self.act = nn.GELU()
        self.proj2 = nn.Linear(hidden, config.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.act(self.proj1(x)))


@register_link("res_mlp", config=ResMLPConfig)
class ResidualMLPLink(MLPLink):
    """Ablation "res + 2-layer" (the paper's formula without LayerNorms): ``y = skip(x) + mlp(x)``."""

    def __init__(self, config: LinkConfig):
        super().__init__(config)
        self.residual_proj = _skip(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual_proj(x) + super().forward(x)
