"""KV-cached latent rollout against the published re-encoding rollout.

For m latent steps after a 200-token prompt, on a tiny model and on a ~100M-parameter random llama, this
times three things side by side, in one process, interleaved:

- re-encode: the published rollout, a full forward over the growing sequence at every step;
- cached: latentgraph's rollout (prefill once, then one position per step on the KV cache, inner link on);
- floor: the bare backbone forwards a rollout cannot avoid (one prefill plus m - 1 single-position
  forwards, no link, no bookkeeping).

It prints medians, the speed-up (re-encode / cached), how far the cached rollout is above its floor, and
the max absolute difference between the cached and re-encoded latents.

    python benchmarks/rollout.py                 # m = 16 48 80, 3 repeats
    python benchmarks/rollout.py --steps 80 --repeats 1
"""

import argparse
import statistics
import time
from functools import partial

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from latentgraph.core.backbone import cache_kwargs, get_backbone
from latentgraph.core.forward import positions_from_mask
from latentgraph.core.links import make_link
from latentgraph.core.think import latent_rollout
from latentgraph.testing import tiny_backbone, tiny_tokenizer

transformers.logging.set_verbosity_error()


def llama_100m():
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def floor(backbone, embeds, mask, steps):
    """One prefill plus steps - 1 single-position forwards of the bare decoder."""
    decoder, cache = backbone.decoder, backbone.new_cache()
    positions = positions_from_mask(mask)
    with_cache = cache_kwargs(decoder, cache)
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **with_cache)
    for _ in range(steps - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = decoder(inputs_embeds=out.last_hidden_state[:, -1:], attention_mask=mask, position_ids=positions,
                      use_cache=True, **with_cache)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 48, 80])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=200, help="prompt length in tokens")
    args = parser.parse_args()

    tokenizer = tiny_tokenizer()
    models = {"tiny llama (64)": tiny_backbone("llama", 64)[0], "llama ~100M (768x12)": llama_100m()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {args.prompt} tokens, "
          f"median of {args.repeats}\n")
    header = f"{'model':<22}{'params':>8}{'m':>5}{'re-encode s':>13}{'cached s':>10}{'floor s':>9}" \
             f"{'speed-up':>10}{'cached/floor':>14}{'max |diff|':>12}"
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for label, model in models.items():
            backbone = get_backbone(model, tokenizer=tokenizer)
            width = backbone.hidden_size
            inner = make_link("ln_res", role="inner", in_dim=width, out_dim=width, where="benchmark")
            ids = torch.randint(0, model.config.vocab_size, (1, args.prompt))
            embeds, mask = backbone.embed(ids), torch.ones_like(ids)
            floor(backbone, embeds, mask, 4)  # warm-up
            params = sum(p.numel() for p in model.parameters())
            for steps in args.steps:
                variants = {
                    "re-encode": partial(latent_rollout, backbone, inner, embeds, mask, steps, use_cache=False),
                    "cached": partial(latent_rollout, backbone, inner, embeds, mask, steps),
                    "floor": partial(floor, backbone, embeds, mask, steps),
                }
                times, results = {name: [] for name in variants}, {}
                for repeat in range(args.repeats):
                    names = list(variants)
                    for name in names[repeat % 3:] + names[:repeat % 3]:  # rotate: no variant always runs first
                        t, results[name] = timed(variants[name])
                        times[name].append(t)
                med = {k: statistics.median(v) for k, v in times.items()}
                diff = (results["cached"].hidden - results["re-encode"].hidden).abs().max().item()
                print(f"{label:<22}{params / 1e6:>7.1f}M{steps:>5}{med['re-encode']:>13.3f}{med['cached']:>10.3f}"
                      f"{med['floor']:>9.3f}{med['re-encode'] / med['cached']:>9.1f}x"
                      f"{med['cached'] / med['floor']:>13.2f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
