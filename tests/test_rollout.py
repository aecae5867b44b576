"""Latent rollouts and decoding: the KV-cached rollout equals re-encoding, and rows do not depend on padding."""

import pytest
import torch
from conftest import ALL_ARCHS

from latentgraph.core.backbone import get_backbone
from latentgraph.core.forward import positions_from_mask
from latentgraph.core.links import make_link
from latentgraph.core.speak import Sampling, generate, run_to_end
from latentgraph.core.think import latent_rollout
from latentgraph.testing import left_padded


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_cached_rollout_equals_reencoding(tiny, arch):
    model, tokenizer = tiny(arch, 64)
    backbone = get_backbone(model, tokenizer=tokenizer)
    inner = make_link("ln_res", role="inner", in_dim=64, out_dim=64, where="test")
    embeds, mask = left_padded([7, 12], backbone.hidden_size)
    with torch.no_grad():
        cached = latent_rollout(backbone, inner, embeds, mask, steps=10)
        reference = latent_rollout(backbone, inner, embeds, mask, steps=10, use_cache=False)
    assert cached.hidden.shape == cached.embeds.shape == (2, 10, 64)
    assert (cached.hidden - reference.hidden).abs().max() <= 1e-4
    assert (cached.embeds - reference.embeds).abs().max() <= 1e-4
    # embeds[k] is the inner link applied to hidden[k]: the input of step k + 1
    torch.testing.assert_close(cached.embeds, inner(cached.hidden))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_the_cache_is_the_one_the_model_builds_for_itself(tiny, arch):
    """On every supported transformers: DynamicCache, or the cache class of a hybrid model's own (Qwen3.5
    before 5.5), whose forward fails on a DynamicCache."""
    model, tokenizer = tiny(arch, 32)
    backbone = get_backbone(model, tokenizer=tokenizer)
    with torch.no_grad():
        built = type(model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True).past_key_values)
    assert type(backbone.new_cache()) is built
    assert isinstance(backbone.new_cache(autograd=True), built)  # AutogradCache, a DynamicCache, or the own class


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_rollout_and_decoding_do_not_depend_on_padding(tiny, arch):
    model, tokenizer = tiny(arch, 64)
    backbone = get_backbone(model, tokenizer=tokenizer)
    inner = make_link("ln_res", role="inner", in_dim=64, out_dim=64, where="test")
    embeds, mask = left_padded([5, 11, 8], backbone.hidden_size)
    greedy = Sampling(do_sample=False, max_new_tokens=6)
    with torch.no_grad():
        batch = latent_rollout(backbone, inner, embeds, mask, steps=6)
        batch_tokens = run_to_end(generate(backbone, embeds, mask, greedy))
        for i in range(3):
            real = mask[i].bool()
            alone = latent_rollout(backbone, inner, embeds[i:i + 1, real], mask[i:i + 1, real], steps=6)
            assert (alone.hidden[0] - batch.hidden[i]).abs().max() <= 1e-4
            alone = run_to_end(generate(backbone, embeds[i:i + 1, real], mask[i:i + 1, real], greedy))
            assert alone == [batch_tokens[i]]


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_zero_latent_steps_give_empty_thoughts(tiny):
    model, tokenizer = tiny("llama", 64)
    backbone = get_backbone(model, tokenizer=tokenizer)
    inner = make_link("ln_res", role="inner", in_dim=64, out_dim=64, where="test")
    thoughts = latent_rollout(backbone, inner, *left_padded([4, 6], backbone.hidden_size), steps=0)
    assert thoughts.hidden.shape == thoughts.embeds.shape == (2, 0, 64)


def test_sampling_is_seeded_and_respects_top_k(tiny):
    model, tokenizer = tiny("qwen2", 64)
    backbone = get_backbone(model, tokenizer=tokenizer)
    embeds, mask = left_padded([6, 9], backbone.hidden_size)
    sampling = Sampling(do_sample=True, temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=5)
    with torch.no_grad():
        top1 = run_to_end(generate(backbone, embeds, mask, sampling, generators(1)))
        greedy = run_to_end(generate(backbone, embeds, mask, Sampling(do_sample=False, max_new_tokens=5)))
        free = Sampling(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=5)
        a = run_to_end(generate(backbone, embeds, mask, free, generators(3)))
        b = run_to_end(generate(backbone, embeds, mask, free, generators(3)))
    assert top1 == greedy  # top_k=1 sampling is greedy
    assert a == b


def generators(seed, rows=2):
    return [torch.Generator().manual_seed(seed) for _ in range(rows)]


def test_decoding_stops_rows_at_their_end_token(tiny):
    model, tokenizer = tiny("llama", 64)
    backbone = get_backbone(model, tokenizer=tokenizer)
    embeds, mask = left_padded([3, 4], backbone.hidden_size)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        bias = model.lm_head.bias
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        model.lm_head.bias.data[eos] = 1e4  # every step prefers the end token
        try:
            out = run_to_end(generate(backbone, embeds, mask, Sampling(do_sample=False, max_new_tokens=5)))
        finally:
            model.lm_head.bias = bias
    assert [g.ids for g in out] == [[eos], [eos]]
    assert [g.sampled for g in out] == [1, 1]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=1.5), dict(top_k=0)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)
