"""Closed-form initialisation (latentgraph.training.closed_form) on tiny backbones: fits go through the link type's
``Link.fit_affine``, so built-in and user-registered types are written the same way."""

import pytest
import torch
from torch import nn

import latentgraph as lg
from latentgraph.core.links import LinkConfig, make_link
from latentgraph.testing import _CORPUS
from latentgraph.training.closed_form import hidden_states, initialize, realignment

TEXTS = [line for line in _CORPUS.splitlines() if line.strip()]


class AffineConfig(LinkConfig):
    fits: int = 0


@lg.register_link("test_affine", config=AffineConfig)
class Affine(lg.Link):
    """A user type that holds ``y = x @ weight + bias`` in plain tensors, not in an nn.Linear."""

    def __init__(self, config):
        super().__init__(config)
        self.weight = nn.Parameter(torch.zeros(config.in_dim, config.out_dim))
        self.bias = nn.Parameter(torch.zeros(config.out_dim))

    def forward(self, x):
        return x @ self.weight + self.bias

    @torch.no_grad()
    def fit_affine(self, weight, bias, x, targets=None):
        self.weight.copy_(weight)
        self.bias.copy_(bias)


@lg.register_link("test_unfittable")
class Unfittable(lg.Link):
    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.in_dim, config.out_dim)

    def forward(self, x):
        return torch.tanh(self.proj(x))


def _system(tiny, inner, outer):
    (qwen, qwen_tok), (llama, llama_tok) = tiny("qwen2", 64), tiny("llama", 48)
    a = lg.Agent("a", qwen, tokenizer=qwen_tok, latent_steps=2, inner_link=inner)
    b = lg.Agent("b", llama, tokenizer=llama_tok, latent_steps=2, prompt="{a} {question}", inner_link=inner)
    return lg.System([a, b], answer="b").connect("a", "b", link=outer)


@pytest.mark.parametrize("link_type, role, dims", [("linear", "outer", (6, 4)), ("res_linear", "outer", (6, 4)),
                                                   ("res_linear", "inner", (6, 6)), ("test_affine", "outer", (6, 4))])
def test_exact_types_compute_the_least_squares_map_they_are_fitted_with(link_type, role, dims):
    x = torch.randn(40, dims[0])
    y = x @ torch.randn(dims) + torch.randn(dims[1]) + 0.1 * torch.randn(40, dims[1])
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(40, 1)], 1), y).solution  # (in + 1, out)
    weight, bias = solution[:-1], solution[-1]
    link = make_link(link_type, role=role, in_dim=dims[0], out_dim=dims[1], where="t")
    link.fit_affine(weight, bias, x)
    with torch.no_grad():
        torch.testing.assert_close(link(x), x @ weight + bias, rtol=1e-4, atol=1e-4)


def test_initialize_dispatches_through_fit_affine_for_a_registered_type(tiny):
    system = _system(tiny, "test_affine", "test_affine")
    initialize(system, TEXTS, max_tokens=512)
    agent = system.agents["a"]
    hidden, _ = hidden_states(agent, TEXTS, 512)
    with torch.no_grad():
        torch.testing.assert_close(agent.inner_link(hidden), (hidden.double() @ realignment(agent, hidden)).float(),
                                   rtol=1e-4, atol=1e-4)
        assert system.links["a->b"].weight.abs().sum() > 0  # the edge was bridged, through the same method


def test_linear_links_are_fitted_like_the_registered_type(tiny):
    mine, builtin = _system(tiny, "test_affine", "test_affine"), _system(tiny, "linear", "linear")
    initialize(mine, TEXTS, max_tokens=512)
    initialize(builtin, TEXTS, max_tokens=512)
    x = torch.randn(5, 64)
    with torch.no_grad():
        for name in ("a", "a->b"):
            torch.testing.assert_close(builtin.link_modules()[name](x), mine.link_modules()[name](x),
                                       rtol=1e-4, atol=1e-4)


def test_a_type_without_fit_affine_cannot_be_fitted_and_says_where(tiny):
    system = _system(tiny, "linear", "test_unfittable")
    with pytest.raises(lg.GraphError, match=r"edge 'a->b' link: a 'test_unfittable' link cannot be fitted in "
                                            r"closed form .*train it instead"):
        initialize(system, TEXTS, max_tokens=512)
    system.links["a->b"] = nn.Linear(64, 48)
    with pytest.raises(lg.GraphError, match="edge 'a->b' link is a plain Linear"):
        initialize(system, TEXTS, max_tokens=512)
