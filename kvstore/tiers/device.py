"""The device-memory seam under the HBM tier: one flat allocation, bytes in and out, hashes, an export handle.

The HBM tier (hbm.py) owns slots, accounting and the Tier protocol; it reaches the device only through
`DeviceMemory`, so the tier's logic runs anywhere. Two implementations:

* `CudaDeviceMemory` (cuda_device.py): one raw cudaMalloc on a GPU, exported to same-host processes by a
  CUDA IPC handle; what the server uses when hbm_memory > 0 and CUDA is present.
* `HostDeviceMemory` here: the same calls over host memory. It stands in for a GPU where there is none
  (the tier's tests in CI, `hbm_backend = "host"`), exports nothing, and can be told to fail as a lost
  GPU does, so that the server's handling of a dead device is tested on every build.

Every call may raise DeviceError: the device is then gone for good (a CUDA error is sticky for the
context), and the tier is dropped while the server keeps serving from host and SSD.
"""
from __future__ import annotations

import secrets
from typing import Any, Protocol, Sequence

import numpy as np
import xxhash

from kvstore.tiers.base import Buffer


class DeviceError(RuntimeError):
    """The device failed (a CUDA error, a lost GPU): nothing it holds may be trusted any more."""


class DeviceMemory(Protocol):
    capacity_bytes: int
    device_index: int  # the CUDA ordinal in the server's process (-1: not a GPU)
    device_uuid: str  # stable across processes and CUDA_VISIBLE_DEVICES orders ("" when not a GPU)
    pool_id: int  # random, per allocation: a client's mapping of an older allocation is never used for this one

    def ipc_handle(self) -> bytes:
        """What a same-host process opens to map the allocation (cudaIpcMemHandle_t); b"" when it cannot be shared."""

    def upload(self, items: Sequence[tuple[int, Buffer]]) -> None:
        """Copy each buffer to its byte offset; returns once every copy has landed."""

    def hashes(self, spans: Sequence[tuple[int, int]]) -> list[int]:
        """xxh3_64 of each (offset, size_bytes) span, computed where the bytes are."""

    def download(self, offset: int, size_bytes: int) -> bytes: ...

    def span(self, offset: int, size_bytes: int) -> Any:
        """The bytes in place, for a data plane to send from without a copy: a GPU array (__cuda_array_interface__)
        on a GPU, a numpy view otherwise. Valid until the allocation is closed; the caller keeps the slot pinned."""

    def zero(self, offset: int, size_bytes: int) -> None:
        """Zero a span; it may still be under way when this returns, but lands before any later upload."""

    def close(self) -> None: ...


class HostDeviceMemory:
    """DeviceMemory over host memory: the tier's logic without a GPU. `fail()` makes it act like a lost device."""

    device_index = -1
    device_uuid = ""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.pool_id = secrets.randbits(63) or 1
        self.bytes = np.zeros(capacity_bytes, dtype=np.uint8)
        self._failed = ""
        self.uploads = 0  # upload calls, for tests that count passes

    def fail(self, reason: str = "device lost") -> None:
        self._failed = reason

    def _check(self) -> None:
        if self._failed:
            raise DeviceError(self._failed)

    def ipc_handle(self) -> bytes:
        return b""

    def upload(self, items: Sequence[tuple[int, Buffer]]) -> None:
        self._check()
        for offset, data in items:
            src = np.frombuffer(data, dtype=np.uint8)
            self.bytes[offset : offset + len(src)] = src
        self.uploads += 1

    def hashes(self, spans: Sequence[tuple[int, int]]) -> list[int]:
        self._check()
        return [xxhash.xxh3_64_intdigest(self.bytes[offset : offset + size]) for offset, size in spans]

    def download(self, offset: int, size_bytes: int) -> bytes:
        self._check()
        return self.bytes[offset : offset + size_bytes].tobytes()

    def span(self, offset: int, size_bytes: int) -> np.ndarray:
        self._check()
        return self.bytes[offset : offset + size_bytes]

    def zero(self, offset: int, size_bytes: int) -> None:
        self._check()
        self.bytes[offset : offset + size_bytes] = 0

    def close(self) -> None:
        self.bytes = np.zeros(0, dtype=np.uint8)
