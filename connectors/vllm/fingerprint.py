"""The kvstore Fingerprint of a vLLM instance's KV blocks, from its own configuration.

Blocks are shared only between engines with equal fingerprints, so everything that changes a
block's bytes is in it: the weights (model and revision), the geometry and dtype of vLLM's KV
cache spec, its block size, how the attention backend lays a block out in memory (the platform,
the backend's name and vLLM's KV cache layout), and the tensor-parallel rank and size. Both
halves of the connector compute it from the same config; the worker then checks it against the
cache tensors it is given (`check_layer_caches`), so a layout this module failed to predict is
an error at start-up, never a wrong block read. With the `canonical` layout option the blocks are
the bundled engines' (layout.py converts), and so is the fingerprint's layout name. It never
talks to a store.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from connectors.vllm.layout import CANONICAL_BACKENDS
from connectors.vllm.settings import ConnectorSettings
from engines.fingerprint import checkpoint_revision
from engines.paged_cache import KV_LAYOUT
from kvwire.keys import Fingerprint

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

LAYOUT_PREFIX = "vllm"


class UnsupportedConfigError(ValueError):
    """A vLLM configuration whose blocks this connector cannot store safely (said at start-up)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def attention_backend_name(vllm_config: "VllmConfig", head_size: int, dtype: torch.dtype) -> str:
    """The backend vLLM's attention layers will pick, asked the way they ask it (decoder, no sinks)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    with set_current_vllm_config(vllm_config):
        backend = get_attn_backend(head_size, vllm_config.model_config.dtype, vllm_config.cache_config.cache_dtype)
    return backend.get_name()


def model_revision(vllm_config: "VllmConfig", settings: ConnectorSettings) -> str:
    """The weights' identity: an explicit revision, vLLM's --revision, or a content hash of a local checkpoint.

    A hub id without a pinned revision names weights that can change under the same name, so it is
    refused rather than guessed.
    """
    if settings.revision:
        return settings.revision
    model_config = vllm_config.model_config
    if model_config.revision:
        return model_config.revision
    path = Path(model_config.model)
    if path.is_dir():
        try:
            return checkpoint_revision(path)
        except FileNotFoundError as err:
            raise UnsupportedConfigError(f"cannot hash checkpoint {path} ({err}); set kv_connector_extra_config "
                                         "'revision' to the weights' revision") from err
    raise UnsupportedConfigError(f"model {model_config.model!r} has no pinned revision: pass --revision (or "
                                 "kv_connector_extra_config 'revision') so blocks of other weights are never reused")


def layout_name(platform: str, backend: str, kv_cache_layout: str | None, spec_kind: str) -> str:
    return f"{LAYOUT_PREFIX}/{platform}/{backend}/{kv_cache_layout or 'default'}/{spec_kind}"


def vllm_fingerprint(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", settings: ConnectorSettings,
                     tp_rank: int = 0) -> Fingerprint:
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import AttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise UnsupportedConfigError(f"kvstore connector stores models with one attention KV cache group; this one has {kinds}")
    spec = groups[0].kv_cache_spec
    parallel = vllm_config.parallel_config
    cache_layout = kv_cache_config.kv_cache_layout or vllm_config.cache_config.kv_cache_layout
    backend = attention_backend_name(vllm_config, spec.head_size, spec.dtype)
    kv_layout = layout_name(current_platform.device_type, backend, cache_layout, type(spec).__name__)
    if settings.layout == "canonical":
        if (backend, cache_layout) not in CANONICAL_BACKENDS:
            raise UnsupportedConfigError(f"layout 'canonical' converts pages of {sorted(CANONICAL_BACKENDS)} only, "
                                         f"not {backend}/{cache_layout}")
        kv_layout = KV_LAYOUT  # the bundled engines' blocks: same bytes for the same checkpoint and block size
    model = settings.model_name or Path(vllm_config.model_config.model).resolve().name  # as the bundled engines name it
    return Fingerprint(
        model=model,
        revision=model_revision(vllm_config, settings),
        num_layers=len(groups[0].layer_names),
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        block_tokens=spec.block_size,
        dtype=dtype_name(spec.dtype),
        kv_layout=kv_layout,
        tp_rank=tp_rank,
        tp_size=parallel.tensor_parallel_size,
    )


def check_layer_caches(fingerprint: Fingerprint, layer_names: Sequence[str], kv_caches: Mapping[str, torch.Tensor],
                       backends: Mapping[str, str]) -> tuple[int, ...]:
    """Check vLLM's per-layer cache tensors against the fingerprint; returns one layer's block shape.

    Every layer must be a [num_blocks, ...] tensor of the fingerprint's dtype, with the same block shape,
    holding exactly 2 * kv_heads * block_tokens * head_dim elements per block (K and V, nothing else),
    and run by the backend the fingerprint names. Anything else would make stored bytes mean
    something different to another reader with the same fingerprint.
    """
    missing = [n for n in layer_names if n not in kv_caches]
    if missing:
        raise UnsupportedConfigError(f"vLLM registered no KV cache for layers {missing}")
    caches = [kv_caches[n] for n in layer_names]
    block_shape = tuple(caches[0].shape[1:])
    elements = 2 * fingerprint.num_kv_heads * fingerprint.block_tokens * fingerprint.head_dim
    backend = fingerprint.kv_layout.split("/")[2] if fingerprint.kv_layout.startswith(LAYOUT_PREFIX + "/") else None
    for name, cache in zip(layer_names, caches):
        problems = []
        if tuple(cache.shape[1:]) != block_shape or not cache.is_contiguous():
            problems.append(f"shape {tuple(cache.shape)} (contiguous: {cache.is_contiguous()})")
        if dtype_name(cache.dtype) != fingerprint.dtype:
            problems.append(f"dtype {cache.dtype}")
        if cache[0].numel() != elements:
            problems.append(f"{cache[0].numel()} elements a block, not {elements}")
        if backend is not None and backends.get(name, backend) != backend:
            problems.append(f"backend {backends[name]}, not {backend}")
        if problems:
            raise UnsupportedConfigError(f"layer {name}: {', '.join(problems)} does not match fingerprint {fingerprint.kv_layout}")
    return block_shape
