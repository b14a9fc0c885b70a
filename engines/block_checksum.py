"""Block checksums (XXH3-64, seed 0) where the blocks landed in GPU memory, and the numpy reference.

kvstore checks every block against the xxh3_64 its writer computed
(kvclient.integrity.check_block). A GPU cache loaded layer by layer
(adapter.StreamedPrefixLoad) has its blocks spread over pages; hashing them
there with csrc/xxh3_paged.cu checks exactly the bytes attention reads and
keeps sixteen CPU threads, which took the GIL from the thread launching the
forward pass, out of the way. `xxh3_64_parts` is the same algorithm in numpy,
pinned to the xxhash package by tests on any machine; the kernel is pinned to
both on a GPU. Only the long-input path exists: blocks over 240 bytes whose
parts are whole 64-byte stripes; `supports` says whether a layout qualifies.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engines.cuda_kernels import build_error, kernels, on_stream

KERNEL_SOURCE = "xxh3_paged.cu"
M64 = (1 << 64) - 1
PRIME32_1, PRIME32_2, PRIME32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME64_5 = (
    0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
STRIPE, BLOCK = 64, 1024


def supports(part_bytes: int, num_parts: int) -> bool:
    return part_bytes % STRIPE == 0 and part_bytes * num_parts > 240


def _secret64(offset: int, count: int = 8) -> np.ndarray:
    return np.frombuffer(SECRET[offset: offset + 8 * count], dtype="<u8").astype(np.uint64)


def _accumulate(acc: np.ndarray, stripes: np.ndarray, secret_offset: int) -> None:
    """Add stripes [n, 8] (uint64 words) into acc, stripe s keyed by the secret at secret_offset + 8s."""
    keys = np.stack([_secret64(secret_offset + 8 * s) for s in range(len(stripes))]) if len(stripes) else stripes
    dk = stripes ^ keys
    with np.errstate(over="ignore"):
        acc += stripes[:, [1, 0, 3, 2, 5, 4, 7, 6]].sum(axis=0, dtype=np.uint64)
        acc += ((dk & np.uint64(0xFFFFFFFF)) * (dk >> np.uint64(32))).sum(axis=0, dtype=np.uint64)


def _mul128_fold64(a: int, b: int) -> int:
    product = a * b
    return (product & M64) ^ (product >> 64)


def xxh3_64_parts(parts: Sequence[np.ndarray]) -> int:
    """xxh3_64 of the concatenated parts (uint8 arrays), by the long-input algorithm."""
    data = np.concatenate([np.asarray(p, dtype=np.uint8).reshape(-1) for p in parts])
    length = len(data)
    if length <= 240 or length % 8:
        raise ValueError("the reference covers inputs over 240 bytes in whole 8-byte words")
    words = data.view("<u8").astype(np.uint64)
    acc = np.array([PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1], dtype=np.uint64)
    scramble = _secret64(len(SECRET) - STRIPE)
    nb_blocks = (length - 1) // BLOCK
    for n in range(nb_blocks):
        _accumulate(acc, words[n * 128: (n + 1) * 128].reshape(16, 8), 0)
        with np.errstate(over="ignore"):
            acc ^= acc >> np.uint64(47)
            acc ^= scramble
            acc *= np.uint64(PRIME32_1)
    tail = ((length - 1) - BLOCK * nb_blocks) // STRIPE
    _accumulate(acc, words[nb_blocks * 128: nb_blocks * 128 + tail * 8].reshape(tail, 8), 0)
    last = np.frombuffer(data[length - STRIPE:].tobytes(), dtype="<u8").astype(np.uint64)
    _accumulate(acc, last.reshape(1, 8), len(SECRET) - STRIPE - 7)
    h = (length * PRIME64_1) & M64
    merge = [int(x) for x in _secret64(11, 8)]
    a = [int(x) for x in acc]
    for i in range(4):
        h = (h + _mul128_fold64(a[2 * i] ^ merge[2 * i], a[2 * i + 1] ^ merge[2 * i + 1])) & M64
    h ^= h >> 37
    h = (h * 0x165667919E3779F9) & M64
    return h ^ (h >> 32)


class PagedChecksumKernel:
    """csrc/xxh3_paged.cu's xxh3_64_paged."""

    THREADS = 128

    def __init__(self, function) -> None:
        self._kernel = function

    def launch(self, base_ptr: int, block_offsets: torch.Tensor, part_stride: int, part_bytes: int, num_parts: int,
               stream: torch.cuda.Stream) -> torch.Tensor:
        """Enqueue the hashes of len(block_offsets) blocks on stream; returns them (int64 bit patterns)."""
        return self.launch_at(base_ptr, block_offsets.data_ptr(), len(block_offsets), block_offsets.device, part_stride,
                              part_bytes, num_parts, stream)

    def launch_at(self, base_ptr: int, offsets_ptr: int, n: int, device: torch.device, part_stride: int, part_bytes: int,
                  num_parts: int, stream: torch.cuda.Stream) -> torch.Tensor:
        """launch, the blocks' offsets given as the device address of n int64s (a prefix load's table slot)."""
        if not supports(part_bytes, num_parts):
            raise ValueError(f"{num_parts} parts of {part_bytes} bytes: not a layout the kernel hashes")
        out = torch.empty(n, dtype=torch.int64, device=device)
        grid = (-(-n // (self.THREADS // 32)),)  # a warp per block
        with on_stream(stream):
            self._kernel(grid, (self.THREADS,), (
                np.uint64(base_ptr), np.uint64(offsets_ptr), np.int32(n),
                np.int64(part_stride), np.int64(part_bytes), np.int32(num_parts), np.uint64(out.data_ptr()),
            ))
        return out


def paged_kernel() -> PagedChecksumKernel | None:
    """The kernel, or None where it cannot be built (the caller then checks on the host)."""
    built = kernels(KERNEL_SOURCE, ("xxh3_64_paged",))
    return PagedChecksumKernel(built["xxh3_64_paged"]) if built else None


def kernel_error() -> str | None:
    """Why paged_kernel() returned None, if it did."""
    return build_error(KERNEL_SOURCE)
