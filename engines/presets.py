"""Named Llama shapes for random checkpoints (tiny, small, 1b), so a fresh machine can run everything offline.

All use the ByteTokenizer vocabulary (258 ids), so their prompts need no
downloaded tokenizer. `1b` is Llama-3.2-1B's body (16 layers, 2048 hidden,
GQA 32/8, 8192 MLP), about 0.97B parameters: the size the prefix-reuse
benchmark's GPU target is stated for. This module owns the shapes only;
checkpoint.py writes them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engines.checkpoint import save_random_checkpoint
from engines.config import ModelConfig
from engines.tokenizer import ByteTokenizer

_TOKENIZER = ByteTokenizer()
_COMMON = dict(vocab_size=_TOKENIZER.vocab_size, bos_token_id=_TOKENIZER.bos_id, eos_token_id=_TOKENIZER.eos_id,
               max_position_embeddings=32768)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, **_COMMON),
    "small": ModelConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, **_COMMON),
    "1b": ModelConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True, **_COMMON),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def ensure_random_checkpoint(path: str | Path, size: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random checkpoint of the named size at path; an existing checkpoint there is kept, not overwritten."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    return save_random_checkpoint(path, preset(size), seed=seed, dtype=dtype)
