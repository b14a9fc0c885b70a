"""A naive, non-paged Llama forward straight from a state dict, in float64: the oracle for the paged model.

Written independently of engines/ (explicit rotation formula, einsum attention,
repeat_interleave for GQA) so a shared mistake is unlikely.
"""
from __future__ import annotations

import math

import torch

from engines.config import ModelConfig


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def naive_logits(state: dict[str, torch.Tensor], config: ModelConfig, token_ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] (float64) for token_ids at positions 0..T-1, full causal attention."""
    w = {k: v.double().cpu() for k, v in state.items()}
    eps, d = config.rms_norm_eps, config.head_dim
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    t = len(token_ids)
    positions = torch.arange(t)
    x = w["model.embed_tokens.weight"][torch.tensor(token_ids)]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = _rope((h @ w[p + "self_attn.q_proj.weight"].T).view(t, hq, d), positions, config.rope_theta)
        k = _rope((h @ w[p + "self_attn.k_proj.weight"].T).view(t, hkv, d), positions, config.rope_theta)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(t, hkv, d)
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, hq * d)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return _rms_norm(x, w["model.norm.weight"], eps) @ lm_head.T
