"""The tiny model every engine test uses, and helpers to build caches around it."""
from __future__ import annotations

import pytest
import torch

from engines.config import ModelConfig
from engines.model import LlamaForCausalLM
from engines.paged_cache import PagedKVCache

# GQA (4 query heads on 2 KV heads) and a non-default rope_theta, so both are exercised.
TINY_CONFIG = ModelConfig(
    vocab_size=258,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=50000.0,
    max_position_embeddings=512,
    bos_token_id=256,
    eos_token_id=257,
)
SEED = 1234
BLOCK_TOKENS = 4
PROMPT = "The quick brown fox jumps over the lazy dog; sphinx of black quartz, judge my vow."


def make_cache(model: LlamaForCausalLM, num_pages: int = 96, block_tokens: int = BLOCK_TOKENS) -> PagedKVCache:
    return PagedKVCache.for_model(model.config, num_pages, block_tokens, dtype=model.dtype, device=model.device)


gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
