"""The position-independent Llama building blocks: RMSNorm, rotary embeddings, SwiGLU MLP.

Numerics follow Hugging Face's Llama so that a real checkpoint gives the same
logits: RMSNorm and the RoPE angles are computed in float32 and cast back, and
RoPE uses the rotate-half convention that HF checkpoints' q/k weights assume.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel on CUDA (it was eight, and ~9x the GPU time, for 832 tokens of the 1b model);
        # it accumulates in float32 like HF's float32 path, and gave bit-identical bf16 outputs on an H100.
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """Concatenate bias-free Linear weights along outputs; each Linear's weight becomes a view of the result."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[row: row + rows], requires_grad=False)
        row += rows
    return fused


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); attribute names match HF's LlamaMLP so state dicts load as is."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by fuse(); a buffer so .to() moves it

    def fuse(self) -> None:
        self.gate_up_weight = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = nn.functional.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [N, head_dim] for absolute positions [N].

    Computed per pass from the positions rather than from a table, so a chunk
    can start anywhere without a max-length cache, and nothing lives in a
    buffer that meta-device loading would leave uninitialised.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by per-token cos/sin [N, head_dim] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
