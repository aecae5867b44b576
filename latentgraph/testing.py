"""Tiny random backbones for tests and examples: built in well under a second, nothing downloaded.

``tiny_backbone("qwen3_5_text", hidden_size=48)`` returns a 2-layer random model of that architecture and a
byte-level BPE tokenizer trained in-process. Their outputs are noise; their shapes, caches, positions and
prompt handling are those of the real architectures.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from .errors import InputError

# Extra config per architecture, on top of the shared tiny sizes (2 layers, 4 heads, 2 KV heads).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_5_text": {  # hybrid: one Gated DeltaNet (linear attention) layer, one full-attention layer
        "head_dim": 16, "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    },
}

CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Like Gemma's: no system role.
    "no_system": (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """\
You are a helpful assistant. Plan how to solve the question step by step, then answer.
Step 1: read the question. Step 2: write the equation. Step 3: compute the result and check it.
What is 17 * 23? Natalia sold clips to 48 of her friends in April, and then half as many in May.
Feedback: the plan missed a step. Improve your plan and refine it for the solver.
The critic reviews the plan; the solver answers in \\boxed{391}. Put the final answer in a box.
def solve(x): return sum(i * i for i in range(x))  # code, numbers 0 1 2 3 4 5 6 7 8 9
"""


def tiny_tokenizer(chat_template: str | None = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of a few hundred tokens, trained in-process.

    ``chat_template`` is ``"chatml"``, ``"no_system"`` (rejects a system role, like Gemma's) or ``None``.
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATES[chat_template] if chat_template else None
    return tokenizer


def tiny_config(arch: str, hidden_size: int = 64, tokenizer: PreTrainedTokenizerFast | None = None,
                max_positions: int = 512, init_std: float = 0.02):
    """The config of a tiny model of ``arch`` (a key of ``ARCHITECTURES``); ``init_std`` is the weights'
    initial standard deviation (larger: sharper, more input-dependent predictions)."""
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown tiny architecture {arch!r}; choose from {list(ARCHITECTURES)}")
    tokenizer = tokenizer or tiny_tokenizer()
    return AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_std, **ARCHITECTURES[arch],
    )


def tiny_backbone(arch: str = "llama", hidden_size: int = 64, *, seed: int = 0, chat_template: str | None = "chatml",
                  max_positions: int = 512, init_std: float = 0.02) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random causal LM of ``arch`` in fp32 and eval mode, with its tokenizer."""
    tokenizer = tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden_size, tokenizer, max_positions, init_std))
    return model.eval(), tokenizer


def left_padded(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt embeddings (from torch's global generator) for rows of the given lengths, left-padded with
    zeros, and their mask: ``(B, L, width)`` and ``(B, L)``."""
    longest = max(lengths)
    embeds = torch.zeros(len(lengths), longest, width)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for i, n in enumerate(lengths):
        embeds[i, longest - n:] = torch.randn(n, width)
        mask[i, longest - n:] = 1
    return embeds, mask
