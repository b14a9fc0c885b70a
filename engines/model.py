"""LlamaForCausalLM over a paged KV cache.

Module and parameter names mirror Hugging Face's LlamaForCausalLM, so a HF
checkpoint's state dict loads without renaming (checkpoint.py). The model holds
weights only: K/V live in a PagedKVCache passed to every forward call, and a
call's SeqChunks say which pages each sequence owns and where its tokens start.
It refuses to own scheduling, sampling or page allocation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from engines.attention import AttentionMetadata, LayerAttention, SeqChunk
from engines.config import ModelConfig
from engines.cuda_graphs import DEFAULT_MAX_TOKENS, PiecewiseGraphs
from engines.layers import RMSNorm, SwiGLU, apply_rope, fuse_linears, rope_cos_sin
from engines.paged_cache import PagedKVCache

__all__ = ["LlamaForCausalLM", "SeqChunk"]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)
        self.register_buffer("qkv_weight", None, persistent=False)  # set by fuse(); a buffer so .to() moves it

    def fuse(self) -> None:
        """One [q; k; v] weight, with q/k/v_proj.weight rebound as views of it (no second copy)."""
        self.qkv_weight = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N, Hq, D] and k [N, Hkv, D] rotated, v [N, Hkv, D]."""
        n, hq, hkv = x.shape[0], self.num_heads, self.num_kv_heads
        if self.qkv_weight is not None:
            qkv = nn.functional.linear(x, self.qkv_weight).view(n, hq + 2 * hkv, self.head_dim)
            qk = apply_rope(qkv[:, : hq + hkv], cos, sin)  # q and k rotated in one pass
            return qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv:]
        q = apply_rope(self.q_proj(x).view(n, hq, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(n, hkv, self.head_dim), cos, sin)
        return q, k, self.v_proj(x).view(n, hkv, self.head_dim)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    # The layer in the two token-wise halves around attention, which cuda_graphs.py captures apart.
    def pre_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] and attention's output [N, Hq * D] -> the layer's output."""
        x = x + self.self_attn.o_proj(attn)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: LayerAttention,
                index: int) -> torch.Tensor:
        q, k, v = self.pre_attention(x, cos, sin)
        out = attention(index, q, torch.stack((k, v)))
        return self.post_attention(x, out.reshape(x.shape[0], -1))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._graphs: PiecewiseGraphs | None = None

    def fuse_projections(self) -> "LlamaForCausalLM":
        """Fuse q/k/v and gate/up into one matmul each: fewer kernel launches per layer, which is
        what a short chunk after a long cached prefix pays for on a GPU. The HF parameter names
        stay (as views), so state dicts still load and save as before."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def use_cuda_graphs(self, max_tokens: int = DEFAULT_MAX_TOKENS) -> "LlamaForCausalLM":
        """Replay passes of up to max_tokens tokens from piecewise CUDA graphs (cuda_graphs.py),
        captured per token-count bucket on first use; longer passes, GPU-bound anyway, stay eager.
        0 turns them off. Weights must not move afterwards: the graphs hold their addresses."""
        self._graphs = PiecewiseGraphs(self, max_tokens) if max_tokens > 0 else None
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, cache: PagedKVCache, chunks: Sequence[SeqChunk], last_only: bool = False,
                before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run chunks through the model, writing their K/V into cache; returns float32 logits.

        Logits are [total tokens, vocab] in chunk order, or [len(chunks), vocab]
        for each chunk's last token when last_only (all that sampling needs,
        and it skips the vocab projection for the rest of a prefill).
        before_layer(i) runs before layer i touches the cache: a prefix still
        being loaded layer by layer (adapter.PrefixLoad.wait_for_layer) hooks in here.
        """
        self._check_cache(cache)
        meta = AttentionMetadata.build(chunks, cache.block_tokens, self.device)
        attention = LayerAttention(cache.kv, meta, self.config.num_attention_heads, self.dtype)
        token_ids = torch.cat([torch.as_tensor(c.token_ids, dtype=torch.long).reshape(-1) for c in chunks])
        if self._graphs is not None and self._graphs.covers(len(token_ids)):
            x = self._graphs.run(attention, meta, token_ids, before_layer)
        else:
            x = self.model.embed_tokens(token_ids.to(self.device))
            cos, sin = rope_cos_sin(meta.positions, self.config.head_dim, self.config.rope_theta, x.dtype)
            for i, layer in enumerate(self.model.layers):
                if before_layer is not None:
                    before_layer(i)
                x = layer(x, cos, sin, attention, i)
        if last_only:
            ends = torch.tensor([c.num_tokens for c in chunks]).cumsum(0) - 1
            x = x[ends.to(self.device)]
        return self.lm_head(self.model.norm(x)).float()

    def _check_cache(self, cache: PagedKVCache) -> None:
        c = self.config
        ours = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.device)
        theirs = (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.device)
        if ours != theirs:
            raise ValueError(f"cache (layers, kv heads, head_dim, device) {theirs} does not fit model {ours}")
