"""Tiny randomly initialised models and a tokenizer, built in code (never downloaded).

Small enough that a forward pass takes milliseconds, real enough that code which loads
from a directory with `from_pretrained` runs unchanged on them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"

# A chat template in the usual role-tag shape; every turn ends with EOS, as in SmolLM2.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(dirpath: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: one token per byte (256) plus pad, eos, bos
    and unk (260 in all). Any text round-trips. pad is distinct from eos .
    Saved to `dirpath` when one is given."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    specials = [PAD, EOS, BOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if dirpath is not None:
        tokenizer.save_pretrained(dirpath)
    return tokenizer


def tiny_llama(vocab_size: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
               tokenizer: PreTrainedTokenizerFast | None = None) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM in eval mode (dropout off). With a
    tokenizer, the vocabulary size and special token ids come from it."""
    special_ids = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        special_ids = dict(
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **special_ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def save_tiny_policy(dirpath: str | Path, seed: int = 0) -> Path:
    """Save a tiny Llama policy and its tokenizer to `dirpath` (a from_pretrained directory)."""
    dirpath = Path(dirpath)
    tokenizer = tiny_tokenizer(dirpath)
    tiny_llama(tokenizer=tokenizer, seed=seed).save_pretrained(dirpath)
    return dirpath


def tiny_bert_classifier(dirpath: str | Path, hidden: int = 32, layers: int = 2, heads: int = 4,
                         seed: int = 0) -> Path:
    """Save a tiny BertForSequenceClassification with one label (a reward model) and its
    tokenizer to `dirpath`."""
    dirpath = Path(dirpath)
    tokenizer = tiny_tokenizer(dirpath)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(dirpath)
    return dirpath
