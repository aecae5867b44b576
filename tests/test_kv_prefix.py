"""KV prefixes: a receiver that continues a sender's cache reads what a single forward over both would read.

Every check is against a reference that uses no KV prefix: a plain rollout, decoding or teacher-forced pass over
the concatenated inputs, or (where the receiver must not see part of the sender's sequence) a re-encoding with
an explicit attention mask and explicit position ids.
"""

import pytest
import torch

from latentgraph.core.agent import Agent
from latentgraph.core.backbone import get_backbone
from latentgraph.core.forward import Forward, KVPrefix, kv_problem, prefill
from latentgraph.core.links import make_link
from latentgraph.core.messages import Encoded
from latentgraph.core.speak import Sampling, generate, run_to_end
from latentgraph.core.think import latent_rollout
from latentgraph.errors import GraphError
from latentgraph.testing import left_padded, tiny_config
from latentgraph.training.objectives import teacher_forced

ARCHS = ["llama", "qwen2"]
ATOL = 1e-5


def _setup(tiny, arch):
    model, tokenizer = tiny(arch, 64)
    backbone = get_backbone(model, tokenizer=tokenizer)
    sender = make_link("ln_res", role="inner", in_dim=64, out_dim=64, where="sender")
    receiver = make_link("ln_res", role="inner", in_dim=64, out_dim=64, where="receiver")
    return backbone, sender, receiver


def _ones(embeds):
    return torch.ones(embeds.shape[:2], dtype=torch.long)


def _close(a, b):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= ATOL


def _masked_rollout(backbone, inner, embeds, positions, sees, steps):
    """Reference rollout of one row: every step re-encodes the whole sequence with ``sees`` (N, N), True where a
    query position may attend to a key position, and explicit ``positions`` (1, N). A new thought sees what
    the last position saw, and itself."""
    hidden = []
    for _ in range(steps):
        bias = torch.zeros(sees.shape).masked_fill(~sees, torch.finfo(torch.float32).min)[None, None]
        out = backbone.decoder(inputs_embeds=embeds, attention_mask=bias, position_ids=positions, use_cache=False)
        hidden.append(out.last_hidden_state[:, -1])
        embeds = torch.cat([embeds, inner(hidden[-1])[:, None]], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        row = torch.cat([sees[-1], torch.tensor([True])])
        sees = torch.cat([torch.cat([sees, torch.zeros(len(sees), 1, dtype=torch.bool)], dim=1), row[None]])
    return torch.stack(hidden, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sender_steps", [0, 4])
def test_continuing_a_prefix_equals_a_rollout_over_the_concatenation(tiny, arch, sender_steps):
    backbone, sender, receiver = _setup(tiny, arch)
    sent, said = torch.randn(1, 6, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        first = latent_rollout(backbone, sender, sent, _ones(sent), sender_steps, keep_cache=True)
        cache = first.cache
        before = [k.clone() for k, _ in cache.layers]
        second = latent_rollout(backbone, receiver, said, _ones(said), steps=5, prefix=cache)
        whole = torch.cat([sent, first.embeds, said], dim=1)
        reference = latent_rollout(backbone, receiver, whole, _ones(whole), steps=5)
    assert cache.length == 6 + sender_steps and cache.next_position.tolist() == [6 + sender_steps]
    assert cache.layers[0][0].shape == (1, 2, 6 + sender_steps, 16)  # (B, kv_heads, P, head_dim)
    _close(second.hidden, reference.hidden)
    _close(second.embeds, reference.embeds)
    assert second.cache is None  # nothing kept unless asked for
    for kept, (keys, _) in zip(before, cache.layers):  # the receiver never wrote into the sender's tensors
        assert torch.equal(kept, keys)


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_without_cache_keeps_the_same_prefix(tiny, arch):
    """The re-encoding reference (use_cache=False) continues a prefix and returns one like the cached rollout's."""
    backbone, sender, receiver = _setup(tiny, arch)
    embeds, mask = left_padded([4, 7], 64)
    with torch.no_grad():
        prefix = prefill(backbone, *left_padded([5, 3], 64))
        cached = latent_rollout(backbone, sender, embeds, mask, 3, prefix=prefix, keep_cache=True)
        encoded = latent_rollout(backbone, sender, embeds, mask, 3, prefix=prefix, keep_cache=True, use_cache=False)
    _close(cached.hidden, encoded.hidden)
    for (k1, v1), (k2, v2) in zip(cached.cache.layers, encoded.cache.layers):
        _close(k1, k2)
        _close(v1, v2)
    assert torch.equal(cached.cache.mask, encoded.cache.mask)
    assert torch.equal(cached.cache.next_position, encoded.cache.next_position)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_from_a_prefix_equals_decoding_the_concatenation(tiny, arch):
    backbone, sender, _ = _setup(tiny, arch)
    sent, said = torch.randn(1, 6, 64), torch.randn(1, 4, 64)
    greedy = Sampling(do_sample=False, max_new_tokens=8)
    with torch.no_grad():
        first = latent_rollout(backbone, sender, sent, _ones(sent), steps=3, keep_cache=True)
        continued = run_to_end(generate(backbone, said, _ones(said), greedy, prefix=first.cache))
        whole = torch.cat([sent, first.embeds, said], dim=1)
        reference = run_to_end(generate(backbone, whole, _ones(whole), greedy))
    assert len(continued[0].ids) == 8
    assert continued == reference


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_rows_continue_their_prefix_as_if_alone(tiny, arch):
    """Left padding of the sender's and the receiver's prompts ends up inside the concatenated cache; it is
    masked there, and every row's positions continue its own sender's."""
    backbone, sender, receiver = _setup(tiny, arch)
    sent, sent_mask = left_padded([3, 7, 5], 64)
    said, said_mask = left_padded([6, 2, 4], 64)
    greedy = Sampling(do_sample=False, max_new_tokens=5)
    with torch.no_grad():
        first = latent_rollout(backbone, sender, sent, sent_mask, steps=3, keep_cache=True)
        second = latent_rollout(backbone, receiver, said, said_mask, steps=4, prefix=first.cache)
        spoken = run_to_end(generate(backbone, said, said_mask, greedy, prefix=first.cache))
        assert first.cache.next_position.tolist() == [6, 10, 8]
        for i in range(3):
            s, r = sent_mask[i].bool(), said_mask[i].bool()
            alone = latent_rollout(backbone, sender, sent[i:i + 1, s], sent_mask[i:i + 1, s], steps=3, keep_cache=True)
            _close(alone.embeds[0], first.embeds[i])
            after = latent_rollout(backbone, receiver, said[i:i + 1, r], said_mask[i:i + 1, r], 4, prefix=alone.cache)
            _close(after.hidden[0], second.hidden[i])
            assert run_to_end(generate(backbone, said[i:i + 1, r], said_mask[i:i + 1, r], greedy,
                                       prefix=alone.cache)) == [spoken[i]]
            # the row taken out of the batch's prefix continues the same way
            picked = latent_rollout(backbone, receiver, said[i:i + 1], said_mask[i:i + 1], 4,
                                    prefix=first.cache.select([i]))
            _close(picked.hidden[0], second.hidden[i])


@pytest.mark.parametrize("arch", ARCHS)
def test_thoughts_only_reads_the_thoughts_at_their_own_positions(tiny, arch):
    backbone, sender, receiver = _setup(tiny, arch)
    sent, said, m = torch.randn(1, 5, 64), torch.randn(1, 4, 64), 3
    with torch.no_grad():
        first = latent_rollout(backbone, sender, sent, _ones(sent), m, keep_cache=True)
        thoughts = first.cache.thoughts_only(m)
        second = latent_rollout(backbone, receiver, said, _ones(said), steps=4, prefix=thoughts)
        # reference: the whole sequence at its own positions, the receiver's positions blind to the sender's prompt
        whole = torch.cat([sent, first.embeds, said], dim=1)
        n, ls = whole.shape[1], sent.shape[1]
        sees = torch.ones(n, n, dtype=torch.bool).tril()
        sees[ls + m:, :ls] = False
        reference = _masked_rollout(backbone, receiver, whole, torch.arange(n)[None], sees, steps=4)
    assert thoughts.length == m and thoughts.next_position.tolist() == [ls + m]
    _close(second.hidden, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_concatenated_prefixes_are_read_end_to_end(tiny, arch):
    """Each part keeps its own positions and sees only itself; the receiver sees both and comes after both."""
    backbone, sender, receiver = _setup(tiny, arch)
    a, b, said = torch.randn(1, 4, 64), torch.randn(1, 6, 64), torch.randn(1, 3, 64)
    with torch.no_grad():
        first = latent_rollout(backbone, sender, a, _ones(a), steps=2, keep_cache=True)
        other = latent_rollout(backbone, sender, b, _ones(b), steps=3, keep_cache=True)
        both = KVPrefix.concat([first.cache, other.cache])
        second = latent_rollout(backbone, receiver, said, _ones(said), steps=4, prefix=both)
        parts = [torch.cat([a, first.embeds], dim=1), torch.cat([b, other.embeds], dim=1)]
        na, nb = parts[0].shape[1], parts[1].shape[1]
        whole = torch.cat([*parts, said], dim=1)
        positions = torch.cat([torch.arange(na), torch.arange(nb), na + nb + torch.arange(said.shape[1])])[None]
        sees = torch.ones(len(positions[0]), len(positions[0]), dtype=torch.bool).tril()
        sees[na:na + nb, :na] = False  # the second part never saw the first
        reference = _masked_rollout(backbone, receiver, whole, positions, sees, steps=4)
    assert both.length == na + nb and both.next_position.tolist() == [na + nb]
    _close(second.hidden, reference)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grad_steps", [None, 1])
def test_a_loss_on_the_receiver_reaches_the_sender(tiny, arch, grad_steps):
    backbone, sender, receiver = _setup(tiny, arch)
    sent = torch.randn(1, 5, 64, requires_grad=True)  # stands for what upstream links put into the prompt
    said = torch.randn(1, 4, 64)
    first = latent_rollout(backbone, sender, sent, _ones(sent), steps=3, keep_cache=True, grad_steps=grad_steps)
    second = latent_rollout(backbone, receiver, said, _ones(said), steps=2, prefix=first.cache)
    second.hidden.pow(2).sum().backward()
    # the prefill stays in the graph however few steps do, and so does its prompt's part of the cache
    assert sent.grad is not None and sent.grad.abs().sum() > 0
    link_gradient = sum(p.grad.abs().sum() for p in sender.parameters() if p.grad is not None)
    if grad_steps is None:  # the thoughts' keys and values came from the sender's inner link
        assert link_gradient > 0
    else:  # no forward that read a thought kept its graph
        assert link_gradient == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("logits", [False, True])
def test_teacher_forcing_after_a_prefix_equals_forcing_the_concatenation(tiny, arch, logits):
    model, tokenizer = tiny(arch, 64)
    agent = Agent("solver", model, tokenizer=tokenizer)
    sent, sent_mask = left_padded([5, 3], 64)
    said, said_mask = left_padded([2, 4], 64)
    targets = [[7, 8, 9], [10, 11]]
    with torch.no_grad():
        prefix = prefill(agent.backbone, sent, sent_mask)
        forced = teacher_forced(agent, Encoded(said, said_mask, [0, 0], prefix=prefix), targets, logits=logits)
        whole = Encoded(torch.cat([sent, said], dim=1), torch.cat([sent_mask, said_mask], dim=1), [0, 0])
        reference = teacher_forced(agent, whole, targets, logits=logits)
    real = forced.mask.bool()
    _close(forced.hidden[real], reference.hidden[real])
    if logits:
        _close(forced.logits[real], reference.logits[real])


def test_a_prefix_can_be_selected_moved_and_trimmed_without_changing_positions(tiny):
    backbone, sender, _ = _setup(tiny, "llama")
    with torch.no_grad():
        prefix = latent_rollout(backbone, sender, *left_padded([4, 6], 64), steps=2, keep_cache=True).cache
    row = prefix.select([1])
    assert torch.equal(row.mask, prefix.mask[1:]) and row.next_position.tolist() == [8]
    assert torch.equal(row.layers[1][1], prefix.layers[1][1][1:])
    assert prefix.to("cpu").next_position.tolist() == [6, 8]
    with pytest.raises(GraphError, match="keep between 1 and 8"):
        prefix.thoughts_only(9)


def test_a_cache_that_is_not_full_attention_is_no_prefix(tiny):
    model, tokenizer = tiny("gemma3_text", 64)
    forward = Forward(get_backbone(model, tokenizer=tokenizer))
    with torch.no_grad():
        forward(torch.ones(1, 3, dtype=torch.long), ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(GraphError, match="DynamicSlidingWindowLayer.*use a latent edge"):
        forward.kv_prefix()


def _config_only(tmp_path, arch, hidden_size=64):
    """A backbone whose directory holds a config and no weights: kv_problem must not need them."""
    folder = tmp_path / f"{arch}-{hidden_size}"
    tiny_config(arch, hidden_size).save_pretrained(folder)
    return get_backbone(folder)


def test_kv_problem_names_what_differs(tiny, tmp_path):
    model, tokenizer = tiny("llama", 64)
    llama = get_backbone(model, tokenizer=tokenizer)
    assert kv_problem(llama, llama) is None
    same = _config_only(tmp_path, "llama")
    assert kv_problem(llama, same) is None  # same architecture and sizes, another copy
    smaller = kv_problem(same, _config_only(tmp_path, "llama", 32))
    assert "hidden_size 64 against 32" in smaller and "head_dim 16 against 8" in smaller
    assert "model_type llama against qwen2" in kv_problem(same, _config_only(tmp_path, "qwen2"))
    assert not same.loaded
    spread = get_backbone(tmp_path / "llama-64", device_map="auto", max_memory={"cpu": "2GiB"})
    assert "is spread by a device map" in kv_problem(spread, spread) and "use a latent edge" in kv_problem(same, spread)
    assert not spread.loaded


@pytest.mark.parametrize("arch, kind", [("gemma3_text", "sliding_attention"), ("qwen3_5_text", "linear_attention"),
                                        ("mistral", "sliding_attention")])
def test_kv_problem_refuses_caches_that_cannot_be_concatenated(tmp_path, arch, kind):
    backbone = _config_only(tmp_path, arch)
    problem = kv_problem(backbone, backbone)
    assert f"has {kind} layers" in problem and "use a latent edge" in problem
    assert not backbone.loaded
