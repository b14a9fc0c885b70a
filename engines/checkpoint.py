"""Hugging Face-format checkpoints: load one into LlamaForCausalLM, or make a random one.

A checkpoint directory holds `config.json` and either `model.safetensors` or
shards listed in `model.safetensors.index.json`, with HF Llama tensor names.
Random checkpoints exist so that tests and benchmarks need no download: they
are seeded on the CPU generator, so a (config, seed) pair gives the same bytes
on every machine. This module refuses to own tokenizers and KV caches.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engines.config import ModelConfig, dtype_from_name, dtype_name
from engines.model import LlamaForCausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
INIT_STD = 0.02
# Older HF checkpoints saved the rotary table; it is recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match its config."""


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a HF Llama checkpoint and its shape, in a fixed order."""
    h, kv_dim = config.hidden_size, config.num_key_value_heads * config.head_dim
    q_dim, inter = config.num_attention_heads * config.head_dim, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def random_state_dict(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 0.02) and norms = 1, HF's own init, drawn in float32 on the CPU then cast.

    With unit norms every layer's output stays O(1) and logits differ across
    positions, so greedy decoding is deterministic yet not constant.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.empty(shape).normal_(0.0, INIT_STD, generator=generator)
        state[name] = tensor.to(dtype)
    return state


def save_checkpoint(path: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write config.json and a single model.safetensors into directory path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # HF omits the tied copy; safetensors refuses shared storage
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    config.to_json(path / "config.json")
    return path


def save_random_checkpoint(
    path: str | Path, config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Create a seeded random Llama checkpoint directory at path; returns path."""
    config = ModelConfig.from_dict({**config.to_dict(), "torch_dtype": dtype_name(dtype)})
    return save_checkpoint(path, config, random_state_dict(config, seed, dtype))


def load_state_dict(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = [WEIGHTS_NAME]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(path / shard), device=str(device)))
    return state


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LlamaForCausalLM:
    """Load a HF Llama checkpoint directory; dtype defaults to the config's torch_dtype.

    The model is built on the meta device and the loaded tensors are assigned
    to it, so weights are never initialised twice or held in two copies.
    """
    config = ModelConfig.from_json(Path(path) / "config.json")
    dtype = dtype or dtype_from_name(config.torch_dtype)
    state = {k: v for k, v in load_state_dict(path, device).items() if not k.endswith(_IGNORED_SUFFIXES)}
    expected = tensor_shapes(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, config implies {shape}")
        state[name] = state[name].to(dtype)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False).fuse_projections()
