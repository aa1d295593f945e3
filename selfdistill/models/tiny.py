"""Tiny random-initialised models with a word-level tokenizer and a chat template.

For unit tests and smoke runs: they build from a config in milliseconds, need no download,
and know the teacher templates' words, so every code path runs as with a real model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from selfdistill.data.prompts import CONTEXT_PREFIX, TEACHER_TEMPLATES

SPECIAL = ["[PAD]", "[UNK]", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
_WORD = re.compile(r"\w+|[^\w\s]")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def tiny_tokenizer(extra_words: list[str] = ()):
    """A word-level tokenizer (words and single punctuation marks) with a simple chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = " ".join(list(TEACHER_TEMPLATES.values()) + [CONTEXT_PREFIX, "system user assistant"])
    vocab: dict[str, int] = {}
    for token in SPECIAL + words_of(base) + list(extra_words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(pattern=r"<\|\w+\|>", behavior="isolated"), pre_tokenizers.Whitespace()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_model(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0, tied: bool = False):
    """A randomly initialised Llama sized for tests (`tied`: output head = input embedding, as in SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(directory: str | Path, extra_words: list[str] = (), **model_kwargs) -> Path:
    """Write a tiny model + tokenizer that `load_model(directory)` reads."""
    tokenizer = tiny_tokenizer(extra_words)
    model = tiny_model(tokenizer, **model_kwargs)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
