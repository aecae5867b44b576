"""A real tiny llama whose greedy output follows a script: the token after ``t`` is ``script[t]``.

The tokenizer is word-level (one token per whitespace-separated word; decoding joins words with spaces).
The model's embeddings are one-hot, its ``lm_head`` maps each word to its successor with a large margin,
and its attention and MLP keep small random weights: logits still depend on the whole context (so a wrong
cache or wrong positions show up in them) while the argmax follows the script. A word with no successor in
the script is followed by the end token.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from latentgraph.testing import tiny_config

END = "<eos>"
SPECIALS = ["<unk>", "<pad>", END]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(dict.fromkeys(SPECIALS + words))}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>",
                                        eos_token=END)
    tokenizer.chat_template = "{{ messages[-1]['content'] }}"  # the prompt is the user text, word for word
    return tokenizer


def scripted_backbone(script: dict[str, str], extra_words: list[str] = (), *, hidden_size: int = 64,
                      max_positions: int = 512, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny llama and word-level tokenizer that greedily continue each word with ``script[word]``."""
    words = list(dict.fromkeys([*script, *script.values(), *extra_words]))
    tokenizer = word_tokenizer(words)
    vocab = tokenizer.get_vocab()
    if len(vocab) > hidden_size:
        raise ValueError(f"{len(vocab)} words need hidden_size >= {len(vocab)}")
    config = tiny_config("llama", hidden_size, tokenizer, max_positions)
    config.tie_word_embeddings = False
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight  # (V, H)
        embeddings.zero_()
        embeddings[:, : len(vocab)] = torch.eye(len(vocab))
        head = model.get_output_embeddings().weight  # (V, H)
        head.zero_()
        successor = {vocab[w]: vocab[script.get(w, END)] for w in vocab}
        for word, following in successor.items():
            head[following, word] = 4.0  # after the final norm a one-hot is ~sqrt(H): a margin of ~30 logits
    return model, tokenizer
