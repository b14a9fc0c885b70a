"""Small host-to-device uploads (copy plans, page offsets) through reused page-locked buffers.

A prefix load sends the GPU a few kilobytes of tables before its copies can run: the
gather kernel's (offset, page) table and the checksum kernel's page offsets. They must
come from page-locked memory, or the copy stream's next work waits on a synchronous
pageable copy; but `Tensor.pin_memory()` allocates (cudaHostAlloc) on every call, and two
of those cost 0.5 ms of the ~1 ms a load spent before its first copy (8k prompt, 1b model,
H200). So buffers are allocated once and reused, each handed out again only after the GPU
has finished with it (its event), which is long done by then.

TableRing is a load's: its tables written straight into a page-locked slot and sent in one
copy into a device buffer the slot keeps, so a load allocates nothing and makes no tensor
views; PinnedDownloads brings the checksum kernel's answers back. (One-off plans, in
benchmarks and tests, upload theirs through `PagedGatherKernel.upload`, a fresh buffer each.)
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from engines.cuda_events import StreamEvent, cuda_runtime, new_event

RING_DEPTH = 8  # table slots in turn; a load takes one
CUDA_MEMCPY_HOST_TO_DEVICE, CUDA_MEMCPY_DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind
MIN_WORDS = 4096  # int64 words a buffer holds at least (32 KiB); grown to the largest table seen


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
        runtime = cuda_runtime()
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


class TableSlot:
    """One load's tables: `words` (page-locked int64, numpy) written on the host, sent whole by upload() into a device
    buffer that stays allocated (ptr(i): the device address of word i). Taken from a TableRing, given back by the load
    once every kernel reading it is enqueued; the ring hands it out again only after those kernels have run."""

    def __init__(self, device: torch.device, words: int) -> None:
        self.host = torch.empty(words, dtype=torch.int64, pin_memory=True)
        self.words = self.host.numpy()
        self.device_words = torch.empty(words, dtype=torch.int64, device=device)
        self.device_ptr = self.device_words.data_ptr()
        self.released: StreamEvent | None = None  # recorded after the last kernel that reads the device words
        self.busy = False

    @property
    def capacity(self) -> int:
        return len(self.words)

    def ptr(self, word: int) -> int:
        return self.device_ptr + 8 * word

    def upload(self, words: int, stream_ptr: int) -> None:
        """The first `words` words to the device, on the stream (ordered before what is enqueued there next)."""
        if not words:
            return
        runtime = cuda_runtime()
        if runtime is not None:
            runtime.memcpyAsync(self.device_ptr, self.host.data_ptr(), 8 * words, CUDA_MEMCPY_HOST_TO_DEVICE, stream_ptr)
        else:
            with torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr)):
                self.device_words[:words].copy_(self.host[:words], non_blocking=True)


class TableRing:
    """TableSlots of one device, reused in turn: a load's gather and checksum tables cost one host-side write and one
    copy, no allocation (a device allocation and its views cost ~20-40 us of the thread launching the pass).

    A slot is handed out again only once it is given back and the event it was given back with has passed, so a load
    that never gives its slot back (a bug) costs memory, never another load's table."""

    def __init__(self, device: torch.device, depth: int = RING_DEPTH) -> None:
        self.device, self.depth = device, depth
        self._slots: list[TableSlot] = []
        self._next = 0
        self._lock = threading.Lock()

    def take(self, words: int) -> TableSlot:
        """A slot holding at least `words` words, marked busy until give_back."""
        with self._lock:
            slot = self._free_slot()
            if slot is None or slot.capacity < words:
                fresh = TableSlot(self.device, max(MIN_WORDS, 2 * words))
                if slot is None:
                    self._slots.append(fresh)
                else:
                    self._slots[self._slots.index(slot)] = fresh
                slot = fresh
            slot.busy = True
            return slot

    def _free_slot(self) -> TableSlot | None:
        """The next slot in turn that is not busy, its last reader done (waited for: long past in practice); None
        when all of a full ring are busy (loads in flight on several threads) or the ring is not full yet."""
        if len(self._slots) < self.depth:
            return None
        for _ in range(len(self._slots)):
            slot = self._slots[self._next]
            self._next = (self._next + 1) % len(self._slots)
            if not slot.busy:
                if slot.released is not None:
                    slot.released.synchronize()
                return slot
        return None

    def give_back(self, slot: TableSlot, stream_ptr: int) -> None:
        """The load is done with the slot once the stream has passed this point (every kernel reading it is enqueued)."""
        event = slot.released or new_event(self.device)
        event.record(stream_ptr)
        with self._lock:
            slot.released, slot.busy = event, False
