"""Small host-to-device uploads (copy plans, page offsets) through reused page-locked buffers.

A prefix load sends the GPU a few kilobytes of tables before its copies can run: the
gather kernel's (offset, page) table and the checksum kernel's page offsets. They must
come from page-locked memory, or the copy stream's next work waits on a synchronous
pageable copy; but `Tensor.pin_memory()` allocates (cudaHostAlloc) on every call, and two
of those cost 0.5 ms of the ~1 ms a load spent before its first copy (8k prompt, 1b model,
H200). A load sends all its tables in one copy (upload_many). Here a small ring of page-locked buffers is allocated once and reused: a buffer is
handed out again only after the GPU has finished reading it (its event), which is long
done by then, since the ring is deeper than the loads one adapter has in flight.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch

RING_DEPTH = 8  # buffers in turn; a load takes one (upload_many)
CUDA_MEMCPY_HOST_TO_DEVICE, CUDA_MEMCPY_DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind
MIN_WORDS = 4096  # int64 words a buffer holds at least (32 KiB); grown to the largest table seen


@dataclass
class _Staging:
    host: torch.Tensor | None = None  # page-locked int64, capacity words
    ready: torch.cuda.Event | None = None  # recorded after the last copy out of host


class PinnedUploads:
    """upload(array, device, stream): the array's int64 words as a device tensor, copied on stream; upload_many
    several arrays in one copy (a load's tables: a copy call and a device allocation each cost ~20-40 us of the
    thread launching the forward pass)."""

    def __init__(self, depth: int = RING_DEPTH) -> None:
        self._ring = [_Staging() for _ in range(depth)]
        self._next = 0
        self._lock = threading.Lock()

    def upload(self, words: np.ndarray, device: torch.device, stream: torch.cuda.Stream) -> torch.Tensor:
        """A copy of words (any shape, as int64) on device, ordered on stream before whatever is enqueued there next."""
        return self.upload_many([words], device, stream)[0]

    def upload_many(self, arrays: list[np.ndarray], device: torch.device, stream: torch.cuda.Stream) -> list[torch.Tensor]:
        """Each array's copy (as int64, its shape kept) on device, all through one buffer and one copy on stream:
        views of one device allocation, which lives as long as any of them."""
        arrays = [np.asarray(a, dtype=np.int64) for a in arrays]
        n = sum(a.size for a in arrays)
        with self._lock:
            staging = self._ring[self._next]
            self._next = (self._next + 1) % len(self._ring)
            if staging.ready is not None:
                staging.ready.synchronize()  # the GPU read this buffer long ago; this only makes sure
            if staging.host is None or staging.host.numel() < n:
                staging.host = torch.empty(max(MIN_WORDS, 2 * n), dtype=torch.int64, pin_memory=True)
            host = staging.host.numpy()
            at = 0
            for a in arrays:
                host[at: at + a.size] = a.reshape(-1)
                at += a.size
            with torch.cuda.stream(stream):
                out = torch.empty(max(n, 1), dtype=torch.int64, device=device)
                _copy_to_device(out, staging.host, n, stream)
                staging.ready = torch.cuda.Event()
                staging.ready.record(stream)
        views, at = [], 0
        for a in arrays:
            views.append(out[at: at + a.size].view(a.shape))
            at += a.size
        return views


class PinnedDownloads:
    """Small device-to-host answers (the checksum kernel's hashes) through page-locked buffers kept for reuse:
    `Tensor.cpu()` on a load's last step allocated and synchronized (~50 us of an 8k prompt's load, H200 host).
    start() enqueues the copy on a stream and hands out its buffer; the caller reads it once the stream has passed
    the copy (its event) and gives it back with done(). A buffer is handed out again only after done()."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def start(self, words: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
        """A page-locked host tensor of words' int64 values once stream has run past this call (record an event)."""
        n = words.numel()
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= n]
            host = self._free.pop(fits[0]) if fits else torch.empty(max(MIN_WORDS, n), dtype=torch.int64, pin_memory=True)
        runtime = _cuda_runtime()
        if runtime is not None and n:
            runtime.memcpyAsync(host.data_ptr(), words.data_ptr(), 8 * n, CUDA_MEMCPY_DEVICE_TO_HOST, stream.cuda_stream)
        elif n:
            with torch.cuda.stream(stream):
                host[:n].copy_(words.reshape(-1), non_blocking=True)
        return host[:n]

    def done(self, host: torch.Tensor) -> None:
        """Give back a buffer start() handed out, once read (or once its copy can no longer be running)."""
        base = host._base if host._base is not None else host
        with self._lock:
            if len(self._free) < RING_DEPTH:
                self._free.append(base)


def _copy_to_device(out: torch.Tensor, host: torch.Tensor, words: int, stream: torch.cuda.Stream) -> None:
    """words int64s from page-locked host into out, on stream: cudaMemcpyAsync itself where cupy is (a few us);
    torch's copy_ from page-locked memory also records the buffer's use for its host allocator (~35 us a call)."""
    if not words:
        return
    runtime = _cuda_runtime()
    if runtime is not None:
        runtime.memcpyAsync(out.data_ptr(), host.data_ptr(), 8 * words, CUDA_MEMCPY_HOST_TO_DEVICE, stream.cuda_stream)
    else:
        out[:words].copy_(host[:words], non_blocking=True)


@functools.cache
def _cuda_runtime():
    """cupy's CUDA runtime module, or None (no cupy, or none that loads): imported at the first upload, not with the
    engines, which run on CPUs too."""
    try:
        from cupy.cuda import runtime
    except Exception:
        return None
    return runtime
