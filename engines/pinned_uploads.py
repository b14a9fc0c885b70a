"""Small host-to-device uploads (copy plans, page offsets) through reused page-locked buffers.

A prefix load sends the GPU a few kilobytes of tables before its copies can run: the
gather kernel's (offset, page) table and the checksum kernel's page offsets. They must
come from page-locked memory, or the copy stream's next work waits on a synchronous
pageable copy; but `Tensor.pin_memory()` allocates (cudaHostAlloc) on every call, and two
of those cost 0.5 ms of the ~1 ms a load spent before its first copy (8k prompt, 1b model,
H200). Here a small ring of page-locked buffers is allocated once and reused: a buffer is
handed out again only after the GPU has finished reading it (its event), which is long
done by then, since the ring is deeper than the loads one adapter has in flight.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

RING_DEPTH = 8  # buffers in turn; a load takes two
MIN_WORDS = 4096  # int64 words a buffer holds at least (32 KiB); grown to the largest table seen


@dataclass
class _Staging:
    host: torch.Tensor | None = None  # page-locked int64, capacity words
    ready: torch.cuda.Event | None = None  # recorded after the last copy out of host


class PinnedUploads:
    """upload(array, device, stream): the array's int64 words as a device tensor, copied on stream."""

    def __init__(self, depth: int = RING_DEPTH) -> None:
        self._ring = [_Staging() for _ in range(depth)]
        self._next = 0
        self._lock = threading.Lock()

    def upload(self, words: np.ndarray, device: torch.device, stream: torch.cuda.Stream) -> torch.Tensor:
        """A copy of words (any shape, as int64) on device, ordered on stream before whatever is enqueued there next."""
        words = np.ascontiguousarray(words, dtype=np.int64)
        n = words.size
        with self._lock:
            staging = self._ring[self._next]
            self._next = (self._next + 1) % len(self._ring)
            if staging.ready is not None:
                staging.ready.synchronize()  # the GPU read this buffer long ago; this only makes sure
            if staging.host is None or staging.host.numel() < n:
                staging.host = torch.empty(max(MIN_WORDS, 2 * n), dtype=torch.int64, pin_memory=True)
            host = staging.host[:n]
            host.numpy()[:] = words.reshape(-1)
            with torch.cuda.stream(stream):
                out = torch.empty(words.shape, dtype=torch.int64, device=device)
                out.view(-1).copy_(host, non_blocking=True)
                staging.ready = torch.cuda.Event()
                staging.ready.record(stream)
        return out
