"""The XXH3 reference and the CUDA kernel must equal the xxhash package's xxh3_64, the checksum kvstore stores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash

from engines.block_checksum import kernel_error, paged_kernel, supports, xxh3_64_parts
from tests.engines.tiny import gpu_only


@pytest.mark.parametrize("length", [248, 256, 1024, 1088, 2048, 5000, 16384 + 64, 3 * 1024 * 7])
def test_reference_equals_xxhash(length):
    data = np.random.default_rng(length).integers(0, 256, length - length % 8, dtype=np.uint8)
    assert xxh3_64_parts([data]) == xxhash.xxh3_64_intdigest(data)


def test_reference_hashes_parts_as_their_concatenation():
    parts = [np.random.default_rng(i).integers(0, 256, 1024, dtype=np.uint8) for i in range(5)]
    assert xxh3_64_parts(parts) == xxhash.xxh3_64_intdigest(np.concatenate(parts))


def test_supports_only_the_long_striped_layout():
    assert supports(16384, 32) and supports(64, 4)
    assert not supports(64, 3)  # 192 bytes: the short-input path
    assert not supports(100, 10)  # parts that split a stripe


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("part_bytes,num_parts", [(64, 4), (1024, 3), (16384, 32), (192, 5)])
def test_kernel_equals_xxhash_on_scattered_parts(part_bytes, num_parts):
    kernel = paged_kernel()
    assert kernel is not None, kernel_error()
    num_blocks, num_pages = 37, 50
    rng = np.random.default_rng(part_bytes)
    # Cache-like layout: part p of the block in page g sits at (p * num_pages + g) * part_bytes.
    memory = torch.from_numpy(rng.integers(0, 256, num_parts * num_pages * part_bytes, dtype=np.uint8)).cuda()
    pages = rng.permutation(num_pages)[:num_blocks]
    offsets = torch.tensor([int(g) * part_bytes for g in pages], dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream()
    got = kernel.launch(memory.data_ptr(), offsets, num_pages * part_bytes, part_bytes, num_parts, stream)
    host = memory.cpu().numpy()
    for i, g in enumerate(pages):
        block = np.concatenate([host[(p * num_pages + g) * part_bytes: (p * num_pages + g + 1) * part_bytes] for p in range(num_parts)])
        assert int(got[i].item()) & ((1 << 64) - 1) == xxhash.xxh3_64_intdigest(block), f"block {i}"
