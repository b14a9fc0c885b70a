"""DeviceMemory on a GPU: one raw cudaMalloc, exported to same-host processes by a CUDA IPC handle.

Raw, not cupy's caching allocator: a legacy IPC handle names a whole allocation, and the caching
allocator's blocks share a base handle with whatever else it carved from the same segment, so a
client would map memory that is not the pool's. One allocation also means one handle for the
life of the server, opened once per client process.

Copies run on a stream of the pool's own, so promotions never queue behind (or hold up) anything
else on the device; zeroing a released slot is enqueued on the same stream, so it always lands
before a later promotion reuses the slot. Blocks are verified where they landed by the XXH3 kernel
the engines use (csrc/xxh3_paged.cu, one part per block); sizes it does not handle are hashed
on the host after a copy back. Every CUDA error becomes DeviceError: a context that saw one is
not trusted again (hbm.py then drops the tier).
"""
from __future__ import annotations

import logging
import secrets
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import xxhash

from kvstore.tiers.base import Buffer
from kvstore.tiers.device import DeviceError
from kvwire.deviceid import device_uuid

log = logging.getLogger(__name__)

KERNEL_SOURCE = "xxh3_paged.cu"
# A wheel carries csrc/ inside this package (setup.py); a source checkout has it at the top.
CSRC_DIRS = (Path(__file__).resolve().parents[1] / "csrc", Path(__file__).resolve().parents[2] / "csrc")
STRIPE_BYTES = 64  # the kernel's long-input path: whole stripes, over 240 bytes
WARPS_PER_CTA = 4


def _kernel_supports(size_bytes: int) -> bool:
    return size_bytes % STRIPE_BYTES == 0 and size_bytes > 240


class CudaDeviceMemory:
    def __init__(self, gpu: int, capacity_bytes: int) -> None:
        try:
            import cupy
            from cupy.cuda import runtime
        except Exception as err:  # not installed, or installed without the CUDA libraries it needs
            raise DeviceError(f"cupy is not importable: {type(err).__name__}: {err}") from None
        self._cupy, self._rt = cupy, runtime
        self.device_index = gpu
        self.capacity_bytes = capacity_bytes
        self.pool_id = secrets.randbits(63) or 1
        self._lock = threading.Lock()  # the kernel's first build
        self._kernel = None
        self._kernel_failed = False
        self.base = 0
        self._whole = None  # a cupy array over the allocation, made at the first span()
        try:
            with cupy.cuda.Device(gpu):
                self._stream = cupy.cuda.Stream(non_blocking=True)
                self.base = runtime.malloc(capacity_bytes)
                # cudaMalloc'd memory is not promised to be zeroed: a client mapping the pool must not
                # find an earlier process's bytes in its free slots.
                runtime.memsetAsync(self.base, 0, capacity_bytes, self._stream.ptr)
                self._stream.synchronize()
                self._handle = bytes(runtime.ipcGetMemHandle(self.base))
            self.device_uuid = device_uuid(gpu)
        except Exception as err:
            self._free()
            raise DeviceError(f"cannot allocate {capacity_bytes} bytes on GPU {gpu}: {err}") from None

    def ipc_handle(self) -> bytes:
        return self._handle

    def _call(self, what: str, fn, *args):
        try:
            with self._cupy.cuda.Device(self.device_index):
                return fn(*args)
        except DeviceError:
            raise
        except Exception as err:  # CUDARuntimeError, CUDADriverError, cupy's own
            raise DeviceError(f"GPU {self.device_index} failed during {what}: {type(err).__name__}: {err}") from None

    def upload(self, items: Sequence[tuple[int, Buffer]]) -> None:
        self._call("upload", self._upload, items)

    def _upload(self, items: Sequence[tuple[int, Buffer]]) -> None:
        rt, stream = self._rt, self._stream
        sources = [np.frombuffer(data, dtype=np.uint8) for _, data in items]  # alive until the copies land
        for (offset, _), src in zip(items, sources):
            self._check_span(offset, src.nbytes)
            rt.memcpyAsync(self.base + offset, src.ctypes.data, src.nbytes, rt.memcpyHostToDevice, stream.ptr)
        stream.synchronize()

    def hashes(self, spans: Sequence[tuple[int, int]]) -> list[int]:
        return self._call("verification", self._hashes, spans)

    def _hashes(self, spans: Sequence[tuple[int, int]]) -> list[int]:
        out: list[int | None] = [None] * len(spans)
        kernel = self._checksum_kernel()
        by_size: dict[int, list[int]] = {}
        for i, (offset, size) in enumerate(spans):
            self._check_span(offset, size)
            if kernel is not None and _kernel_supports(size):
                by_size.setdefault(size, []).append(i)
            else:
                out[i] = xxhash.xxh3_64_intdigest(self._download(offset, size))
        cupy = self._cupy
        for size, members in by_size.items():
            with self._stream:
                offsets = cupy.asarray(np.array([spans[i][0] for i in members], dtype=np.int64))
                digests = cupy.empty(len(members), dtype=cupy.uint64)
                grid = (-(-len(members) // WARPS_PER_CTA),)
                kernel(grid, (32 * WARPS_PER_CTA,), (np.uint64(self.base), np.uint64(offsets.data.ptr), np.int32(len(members)),
                                                     np.int64(size), np.int64(size), np.int32(1), np.uint64(digests.data.ptr)))
                got = digests.get(stream=self._stream)
            for i, digest in zip(members, got.tolist()):
                out[i] = int(digest)
        return out  # type: ignore[return-value]

    def _checksum_kernel(self):
        """The XXH3 kernel, built once; None (host hashing) where NVRTC or the source is missing."""
        with self._lock:
            if self._kernel is None and not self._kernel_failed:
                try:
                    source = next(d / KERNEL_SOURCE for d in CSRC_DIRS if (d / KERNEL_SOURCE).is_file())
                    module = self._cupy.RawModule(code=source.read_text(), options=("-std=c++14",))
                    self._kernel = module.get_function("xxh3_64_paged")
                except Exception as err:
                    self._kernel_failed = True
                    log.warning("HBM tier: the XXH3 kernel is unavailable (%s: %s); promoted blocks are checked on the host",
                                type(err).__name__, err)
            return self._kernel

    def download(self, offset: int, size_bytes: int) -> bytes:
        return self._call("download", self._download, offset, size_bytes)

    def _download(self, offset: int, size_bytes: int) -> bytes:
        self._check_span(offset, size_bytes)
        host = np.empty(size_bytes, dtype=np.uint8)
        self._rt.memcpyAsync(host.ctypes.data, self.base + offset, size_bytes, self._rt.memcpyDeviceToHost, self._stream.ptr)
        self._stream.synchronize()
        return host.tobytes()

    def span(self, offset: int, size_bytes: int):
        """A cupy array over the span (no copy), which UCX's CUDA transports send from; it holds no reference
        that keeps the allocation alive: the server closes the pool only after its data plane stopped."""
        self._check_span(offset, size_bytes)
        cupy = self._cupy
        if self._whole is None:
            memory = cupy.cuda.UnownedMemory(self.base, self.capacity_bytes, self, self.device_index)
            self._whole = cupy.ndarray((self.capacity_bytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
        return self._whole[offset : offset + size_bytes]

    def zero(self, offset: int, size_bytes: int) -> None:
        self._check_span(offset, size_bytes)
        self._call("zeroing", self._rt.memsetAsync, self.base + offset, 0, size_bytes, self._stream.ptr)

    def _check_span(self, offset: int, size_bytes: int) -> None:
        if offset < 0 or size_bytes < 0 or offset + size_bytes > self.capacity_bytes:
            raise ValueError(f"span [{offset}, {offset + size_bytes}) is outside the {self.capacity_bytes}-byte pool")

    def _free(self) -> None:
        self._whole = None
        if self.base:
            base, self.base = self.base, 0
            try:
                with self._cupy.cuda.Device(self.device_index):
                    self._rt.free(base)
            except Exception as err:  # a lost device: the driver reclaims it with the process
                log.debug("freeing the HBM pool failed: %s", err)

    def close(self) -> None:
        try:
            if self.base:
                self._stream.synchronize()
        except Exception:
            pass
        self._free()
