"""RecursiveLinks: published names and shapes, formulas, the registry, save/load."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import latentgraph as lg
from latentgraph.core.config import AgentConfig
from latentgraph.core.links import LinkConfig, LnResConfig, MLPConfig, link_types, make_link

INNER_SHAPES = {  # published inner ln_res state dict, H = 8
    "pre_ln.weight": (8,), "pre_ln.bias": (8,), "proj1.weight": (8, 8), "proj1.bias": (8,),
    "proj2.weight": (8, 8), "proj2.bias": (8,), "post_ln.weight": (8,), "post_ln.bias": (8,),
}
OUTER_SHAPES = {  # published outer ln_res state dict, 6 -> 4
    "ln_source.weight": (6,), "ln_source.bias": (6,), "proj1.weight": (8, 6), "proj1.bias": (8,),
    "proj2.weight": (4, 8), "proj2.bias": (4,), "residual_proj.weight": (4, 6), "residual_proj.bias": (4,),
    "ln_target.weight": (4,), "ln_target.bias": (4,),
}


def _randomize(link):
    with torch.no_grad():
        for p in link.parameters():
            p.normal_()
    return link


def test_ln_res_inner_has_published_names_and_shapes():
    link = make_link("ln_res", role="inner", in_dim=8, out_dim=8, where="test")
    assert {k: tuple(v.shape) for k, v in link.state_dict().items()} == INNER_SHAPES


def test_ln_res_outer_has_published_names_and_shapes():
    link = make_link("ln_res", role="outer", in_dim=6, out_dim=4, where="test")
    assert {k: tuple(v.shape) for k, v in link.state_dict().items()} == OUTER_SHAPES


def test_ln_res_inner_formula():
    link = _randomize(make_link("ln_res", role="inner", in_dim=8, out_dim=8, where="test"))
    x = torch.randn(2, 3, 8)
    ln = nn.functional.layer_norm
    pre = ln(x, (8,), link.pre_ln.weight, link.pre_ln.bias)
    mid = nn.functional.linear(nn.functional.gelu(nn.functional.linear(pre, link.proj1.weight, link.proj1.bias)),
                               link.proj2.weight, link.proj2.bias)
    expected = ln(x + mid, (8,), link.post_ln.weight, link.post_ln.bias)  # the residual adds the raw x
    torch.testing.assert_close(link(x), expected)


def test_ln_res_outer_formula():
    link = _randomize(make_link("ln_res", role="outer", in_dim=6, out_dim=4, where="test"))
    x = torch.randn(2, 3, 6)
    src = nn.functional.layer_norm(x, (6,), link.ln_source.weight, link.ln_source.bias)
    hidden = nn.functional.gelu(src @ link.proj1.weight.T + link.proj1.bias)
    y = hidden @ link.proj2.weight.T + link.proj2.bias + x @ link.residual_proj.weight.T + link.residual_proj.bias
    expected = nn.functional.layer_norm(y, (4,), link.ln_target.weight, link.ln_target.bias)
    torch.testing.assert_close(link(x), expected)


@pytest.mark.parametrize("role", ["inner", "outer"])
@pytest.mark.parametrize("link_type", link_types())
def test_every_registered_type_saves_and_loads_bit_exactly(tmp_path, link_type, role):
    if link_type not in link_types(role):
        pytest.skip(f"{link_type} has no {role} variant")
    dims = (8, 8) if role == "inner" else (8, 6)
    link = _randomize(make_link(link_type, role=role, in_dim=dims[0], out_dim=dims[1], where="test"))
    save_file(link.state_dict(), tmp_path / "link.safetensors")
    fresh = make_link(link.config, role=role, in_dim=dims[0], out_dim=dims[1], where="test")
    fresh.load_state_dict(load_file(tmp_path / "link.safetensors"))
    for (name, a), (_, b) in zip(link.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(3, dims[0])
    assert torch.equal(link(x), fresh(x))
    assert link(x).shape == (3, dims[1])


def test_plain_ablation_variants_compute_their_formulas():
    x = torch.randn(5, 6)
    linear = _randomize(make_link("linear", role="outer", in_dim=6, out_dim=4, where="t"))
    torch.testing.assert_close(linear(x), linear.proj(x))
    res_linear = _randomize(make_link("res_linear", role="inner", in_dim=6, out_dim=6, where="t"))
    torch.testing.assert_close(res_linear(x), x + res_linear.proj(x))  # identity skip when dims agree
    mlp = _randomize(make_link("mlp", role="outer", in_dim=6, out_dim=4, where="t"))
    assert mlp.proj1.out_features == 4  # hidden width defaults to out_dim for the plain variants
    res_mlp = _randomize(make_link("res_mlp", role="outer", in_dim=6, out_dim=4, where="t"))
    expected = res_mlp.residual_proj(x) + res_mlp.proj2(nn.functional.gelu(res_mlp.proj1(x)))
    torch.testing.assert_close(res_mlp(x), expected)


def test_config_fields_and_hidden_dim():
    link = make_link({"type": "ln_res", "hidden_dim": 10}, role="outer", in_dim=6, out_dim=4, where="t")
    assert link.proj1.weight.shape == (10, 6)
    assert link.config == LnResConfig(role="outer", in_dim=6, out_dim=4, hidden_dim=10)
    assert make_link(LinkConfig(type="ln_res"), role="outer", in_dim=6, out_dim=4, where="t").config == \
        LnResConfig(role="outer", in_dim=6, out_dim=4)  # the base config is read as its type's config class


@pytest.mark.parametrize("build", [
    lambda: make_link({"type": "mlp", "hiden_dim": 8}, role="outer", in_dim=6, out_dim=4, where="edge 'a->b'"),
    lambda: MLPConfig(hiden_dim=8),
    lambda: AgentConfig(name="a", backbone="some/model", inner_link={"type": "mlp", "hiden_dim": 8}),
])
def test_a_typo_in_a_link_config_is_an_error_naming_the_field(build):
    with pytest.raises(lg.GraphError, match=r"hiden_dim: unknown field \(a typo\?"):
        build()


@pytest.mark.parametrize("fields, message", [
    ({"type": "linear", "hidden_dim": 8}, "hidden_dim: unknown field"),  # linear has no hidden layer
    ({"type": "mlp", "hidden_dim": "8"}, "hidden_dim: Input should be a valid integer"),
    ({"type": "mlp", "hidden_dim": True}, "hidden_dim: Input should be a valid integer"),
    ({"type": "mlp", "hidden_dim": 0}, "hidden_dim: Input should be greater than or equal to 1"),
])
def test_link_config_fields_are_strict(fields, message):
    with pytest.raises(lg.GraphError, match=f"edge 'a->b': invalid '{fields['type']}' link config: {message}"):
        make_link(fields, role="outer", in_dim=6, out_dim=4, where="edge 'a->b'")


def test_user_registered_type():
    @lg.register_link("test_scale", role="outer")
    class Scale(lg.Link):
        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(config.in_dim, config.out_dim, bias=False)

        def forward(self, x):
            return 2 * self.proj(x)

    assert "test_scale" in link_types("outer") and "test_scale" not in link_types("inner")
    link = make_link("test_scale", role="outer", in_dim=3, out_dim=2, where="t")
    x = torch.randn(4, 3)
    torch.testing.assert_close(link(x), 2 * x @ link.proj.weight.T)
    with pytest.raises(lg.GraphError, match="Link subclasses"):
        lg.register_link("bad")(nn.Linear)
    with pytest.raises(lg.GraphError, match=r"'test_scale' link config: factor: unknown field"):
        make_link({"type": "test_scale", "factor": 3}, role="outer", in_dim=3, out_dim=2, where="t")


def test_user_registered_type_with_its_own_config_class():
    class FactorConfig(LinkConfig):
        factor: float = 2.0

    @lg.register_link("test_factor", role="outer", config=FactorConfig)
    class Factor(lg.Link):
        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(config.in_dim, config.out_dim, bias=False)

        def forward(self, x):
            return self.config.factor * self.proj(x)

    link = make_link({"type": "test_factor", "factor": 3.0}, role="outer", in_dim=3, out_dim=2, where="t")
    assert isinstance(link.config, FactorConfig) and link.config.factor == 3.0
    assert link.config.stored() == {"type": "test_factor", "factor": 3.0}
    with pytest.raises(lg.GraphError, match="factr: unknown field"):
        make_link({"type": "test_factor", "factr": 3.0}, role="outer", in_dim=3, out_dim=2, where="t")
    with pytest.raises(lg.GraphError, match="takes a LinkConfig subclass"):
        lg.register_link("bad", config=dict)


@pytest.mark.parametrize("spec, message", [
    ("no_such_type", "unknown outer link type 'no_such_type'"),
    (LinkConfig(role="outer", in_dim=5, out_dim=4), "link dims 5 -> 4 do not match the backbones .6 -> 4."),
    (LinkConfig(role="inner", in_dim=6, out_dim=4), "needs an outer link"),
    (nn.Linear(6, 3), r"maps \(1, 1, 6\) to \(1, 1, 3\), expected \(1, 1, 4\)"),
    (nn.Linear(5, 4), "fails on an input of shape"),
    (42, "a link is a type name"),
])
def test_bad_links_name_the_place(spec, message):
    with pytest.raises(lg.GraphError, match=message) as info:
        make_link(spec, role="outer", in_dim=6, out_dim=4, where="edge 'a->b'")
    assert "edge 'a->b'" in str(info.value)


def test_inner_ln_res_must_be_square():
    with pytest.raises(lg.GraphError, match="agent 'x'.*H -> H"):
        make_link(LinkConfig(role="inner", in_dim=6, out_dim=4), role="inner", in_dim=6, out_dim=4,
                  where="agent 'x'")
