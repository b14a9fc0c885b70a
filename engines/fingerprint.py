"""The kvstore Fingerprint of a loaded checkpoint: which stored KV blocks this engine may reuse.

Two workers share blocks only when their fingerprints are equal, so everything
that changes a block's bytes goes in: the weights (model name and a content
revision), the KV geometry, the block size, the cache dtype and the block
layout. This module owns that derivation and nothing else; it never talks to a
store.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import xxhash

from engines.checkpoint import INDEX_NAME, WEIGHTS_NAME
from engines.config import ModelConfig, dtype_name
from engines.paged_cache import KV_LAYOUT
from kvwire.keys import Fingerprint

_READ_BYTES = 16 << 20


def weight_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / INDEX_NAME
    if index.exists():
        return [checkpoint_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [checkpoint_dir / WEIGHTS_NAME]


def checkpoint_revision(checkpoint_dir: str | Path) -> str:
    """xxh3-128 over config.json and every weights file, in a fixed order.

    Content, not mtimes or paths: two copies of one checkpoint on two hosts must
    agree, and a re-trained checkpoint saved over the old one must not. Hashing
    reads the weights once at start-up (xxh3 runs at several GB/s); pass an
    explicit revision to skip it for large models whose revision is known.
    """
    checkpoint_dir = Path(checkpoint_dir)
    digest = xxhash.xxh3_128()
    for path in [checkpoint_dir / "config.json", *weight_files(checkpoint_dir)]:
        digest.update(path.name.encode() + b"\x00")
        with open(path, "rb") as f:
            while chunk := f.read(_READ_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def checkpoint_fingerprint(
    checkpoint_dir: str | Path,
    config: ModelConfig,
    cache_dtype: torch.dtype,
    block_tokens: int,
    model: str | None = None,
    revision: str | None = None,
) -> Fingerprint:
    """The fingerprint of `config`'s weights in checkpoint_dir, cached as `cache_dtype` blocks of block_tokens.

    model defaults to the directory name; revision to checkpoint_revision().
    """
    checkpoint_dir = Path(checkpoint_dir)
    return Fingerprint(
        model=model or checkpoint_dir.resolve().name,
        revision=revision or checkpoint_revision(checkpoint_dir),
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        block_tokens=block_tokens,
        dtype=dtype_name(cache_dtype),
        kv_layout=KV_LAYOUT,
    )
