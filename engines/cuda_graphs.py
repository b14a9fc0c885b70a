"""Piecewise CUDA graphs: the forward pass's token-wise work replayed from graphs, attention left eager.

A short chunk after a long cached prefix, and every decode step, is bound by the
CPU launching ~50 small kernels a layer, not by the GPU: on an H100 an 832-token
chunk of the 1b model took 18.6 ms of which the GPU was busy 9.7 ms. Everything
but attention treats tokens independently and depends only on how many there
are, so it is captured once per token-count bucket and replayed; attention
(page writes, the gather over a context of any length, SDPA) stays eager between
the graphs, and so does the caller's before_layer hook, which lets a prefix
still landing layer by layer gate each layer's attention. This is vLLM's
piecewise design. A bucket holds up to `tokens` tokens; the rows past a pass's
own tokens carry stale but finite values and are never read, which is sound
because nothing captured mixes tokens.

Segments, for L layers: [embed, RoPE, layer 0 up to attention], then for each
layer i>0 [layer i-1 after attention, layer i up to attention], then
[layer L-1 after attention]. All persistent tensors are static buffers made
outside the graphs' shared memory pool; a segment's intermediates die with it,
so segments and buckets replaying one after another on one stream can share it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from engines.attention import AttentionMetadata, LayerAttention
from engines.layers import rope_cos_sin

if TYPE_CHECKING:
    from engines.model import LlamaForCausalLM

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 2048


def bucket_sizes(max_tokens: int) -> list[int]:
    """Token counts a graph is captured for: powers of two to 256, then every 128 (at most ~12% padding)."""
    sizes, n = [], 1
    while n < min(256, max_tokens):
        sizes.append(n)
        n *= 2
    n = min(256, max_tokens)
    while n < max_tokens:
        sizes.append(n)
        n += 128
    return sizes + [max_tokens]


@dataclass
class _Bucket:
    """One token count's static buffers and its L+1 graphs."""

    tokens: int
    ids: torch.Tensor  # [T] token ids in
    positions: torch.Tensor  # [T] absolute positions in
    x: torch.Tensor  # [T, hidden] the residual stream, between and out of the graphs
    cos: torch.Tensor  # [T, head_dim]
    sin: torch.Tensor
    q: torch.Tensor  # [T, Hq, D] the current layer's, out of its segment
    kv: torch.Tensor  # [2, T, Hkv, D] its K and V, stacked as LayerAttention takes them
    attn: torch.Tensor  # [T, Hq, D] attention's output, into the next segment
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)


class PiecewiseGraphs:
    def __init__(self, model: "LlamaForCausalLM", max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model = model
        self.sizes = bucket_sizes(max_tokens)
        self.max_tokens = max_tokens
        self._buckets: dict[int, _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def covers(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def run(self, attention: LayerAttention, meta: AttentionMetadata, token_ids: torch.Tensor,
            before_layer: Callable[[int], None] | None) -> torch.Tensor:
        """The residual stream after the last layer, [N, hidden]: a view of a static buffer, valid until the next run."""
        n = token_ids.numel()
        bucket = self._bucket(next(size for size in self.sizes if size >= n))
        bucket.ids[:n].copy_(token_ids, non_blocking=True)
        bucket.positions[:n].copy_(meta.positions)
        q, kv, out = bucket.q[:n], bucket.kv[:, :n], bucket.attn[:n]
        bucket.graphs[0].replay()
        for i, graph in enumerate(bucket.graphs[1:]):
            if before_layer is not None:
                before_layer(i)
            out.copy_(attention(i, q, kv))
            graph.replay()
        return bucket.x[:n]

    def _bucket(self, tokens: int) -> _Bucket:
        bucket = self._buckets.get(tokens)
        if bucket is None:
            bucket = self._buckets[tokens] = self._capture(tokens)
        return bucket

    def _capture(self, tokens: int) -> _Bucket:
        model, cfg = self.model, self.model.config
        device, dtype = model.device, model.dtype
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def empty(*shape, dt=dtype):
            return torch.zeros(shape, dtype=dt, device=device)

        b = _Bucket(tokens, empty(tokens, dt=torch.long), empty(tokens, dt=torch.long), empty(tokens, cfg.hidden_size),
                    empty(tokens, d), empty(tokens, d), empty(tokens, hq, d), empty(2, tokens, hkv, d),
                    empty(tokens, hq, d))
        layers = model.model.layers

        def project(layer) -> None:
            q, k, v = layer.pre_attention(b.x, b.cos, b.sin)
            b.q.copy_(q)
            b.kv[0].copy_(k)
            b.kv[1].copy_(v)

        def first() -> None:
            b.x.copy_(model.model.embed_tokens(b.ids))
            cos, sin = rope_cos_sin(b.positions, cfg.head_dim, cfg.rope_theta, dtype)
            b.cos.copy_(cos)
            b.sin.copy_(sin)
            project(layers[0])

        def between(i: int) -> Callable[[], None]:
            def segment() -> None:
                b.x.copy_(layers[i - 1].post_attention(b.x, b.attn.view(tokens, -1)))
                if i < len(layers):
                    project(layers[i])
            return segment

        segments = [first] + [between(i) for i in range(1, len(layers) + 1)]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up off the capture: cuBLAS handles, workspaces, lazy init
            for segment in segments:
                segment()
        torch.cuda.current_stream(device).wait_stream(side)
        for segment in segments:
            graph = torch.cuda.CUDAGraph()
            # thread_local: checker threads may wait on events of other streams meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                segment()
            b.graphs.append(graph)
        log.debug("captured CUDA graphs", extra={"tokens": tokens, "graphs": len(b.graphs)})
        return b
