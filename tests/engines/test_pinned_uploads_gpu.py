"""engines/pinned_uploads.py on a GPU: what lands is what was given, also when a buffer's turn comes
round again while the stream is still busy (the ring must wait for the GPU, never overwrite a pending copy)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.pinned_uploads import MIN_WORDS, PinnedUploads
from tests.engines.tiny import gpu_only

pytestmark = [pytest.mark.gpu, gpu_only]


def test_uploads_land_exact_while_the_stream_is_busy():
    uploads, stream = PinnedUploads(depth=2), torch.cuda.Stream()
    rng = np.random.default_rng(7)
    sent, got = [], []
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # the copies queue behind this: every buffer is reused before its copy ran
    for size in (1, 17, MIN_WORDS, 3 * MIN_WORDS, 5, 2 * MIN_WORDS + 1):
        words = rng.integers(-2**62, 2**62, size=size, dtype=np.int64)
        sent.append(words)
        got.append(uploads.upload(words, torch.device("cuda"), stream))
    stream.synchronize()
    for words, out in zip(sent, got):
        assert out.dtype == torch.int64 and np.array_equal(out.cpu().numpy(), words)


def test_shape_is_kept():
    table = np.arange(12, dtype=np.int64).reshape(2, 6)
    stream = torch.cuda.Stream()
    out = PinnedUploads().upload(table, torch.device("cuda"), stream)
    stream.synchronize()
    assert tuple(out.shape) == (2, 6) and np.array_equal(out.cpu().numpy(), table)
