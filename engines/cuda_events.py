"""CUDA events and stream orderings for a prefix load's critical path, through cupy's runtime bindings.

A load makes its events and orderings on the thread that then launches the forward pass,
before layer 0's bytes can move. torch's objects for them (torch.cuda.Event, its record,
Stream.wait_stream, torch.cuda.current_stream) cost 2-9 us a call warm on an H200 host and
several times that inside a load, between two passes that have pushed them out of the
caches; an 8k prompt's load made about thirty. cupy's bindings call the CUDA runtime
directly (0.3-0.5 us warm). Where cupy is missing (the copy-engine path on a machine with
no NVRTC) torch's objects do the same jobs behind the same methods.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch

CUDA_EVENT_DEFAULT, CUDA_EVENT_DISABLE_TIMING = 0, 2  # cudaEventDefault (timed), cudaEventDisableTiming
CUDA_ERROR_NOT_READY = 600


class StreamEvent(Protocol):
    """A CUDA event on one device; streams are named by their raw cudaStream_t (an int)."""

    def record(self, stream_ptr: int) -> None: ...
    def wait_on(self, stream_ptr: int) -> None:
        """Hold the stream's later work until this event's last record has passed."""
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        """Whether the last record has passed (a record never made has)."""
    def elapsed_ms(self, end: "StreamEvent") -> float: ...


def current_stream_ptr(device: torch.device) -> int:
    """The calling thread's current stream on device, as a raw pointer: no Stream object made."""
    index = torch.cuda.current_device() if device.index is None else device.index
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def new_event(device: torch.device, timing: bool = False) -> StreamEvent:
    """An event on device (cupy's where cupy loads, else torch's); timing: elapsed_ms may read it."""
    runtime = cuda_runtime()
    if runtime is None:
        return _TorchEvent(device, timing)
    return _RuntimeEvent(runtime, device, timing)


class _RuntimeEvent:
    __slots__ = ("_runtime", "handle")

    def __init__(self, runtime, device: torch.device, timing: bool) -> None:
        flags = CUDA_EVENT_DEFAULT if timing else CUDA_EVENT_DISABLE_TIMING
        index = torch.cuda.current_device() if device.index is None else device.index
        self._runtime = runtime
        if runtime.getDevice() == index:
            self.handle = runtime.eventCreateWithFlags(flags)
        else:  # an event belongs to the device current when it is made
            with torch.cuda.device(index):
                self.handle = runtime.eventCreateWithFlags(flags)

    def record(self, stream_ptr: int) -> None:
        self._runtime.eventRecord(self.handle, stream_ptr)

    def wait_on(self, stream_ptr: int) -> None:
        self._runtime.streamWaitEvent(stream_ptr, self.handle, 0)

    def synchronize(self) -> None:
        self._runtime.eventSynchronize(self.handle)

    def query(self) -> bool:
        try:
            return self._runtime.eventQuery(self.handle) != CUDA_ERROR_NOT_READY
        except self._runtime.CUDARuntimeError as err:
            if getattr(err, "status", None) == CUDA_ERROR_NOT_READY:
                return False
            raise

    def elapsed_ms(self, end: "StreamEvent") -> float:
        return float(self._runtime.eventElapsedTime(self.handle, end.handle))

    def __del__(self) -> None:
        try:
            self._runtime.eventDestroy(self.handle)  # a pending record finishes first: CUDA frees it then
        except Exception:  # the runtime is gone at interpreter exit
            pass


class _TorchEvent:
    __slots__ = ("event",)

    def __init__(self, device: torch.device, timing: bool) -> None:
        self.event = torch.cuda.Event(enable_timing=timing)

    def record(self, stream_ptr: int) -> None:
        self.event.record(torch.cuda.ExternalStream(stream_ptr))

    def wait_on(self, stream_ptr: int) -> None:
        torch.cuda.ExternalStream(stream_ptr).wait_event(self.event)

    def synchronize(self) -> None:
        self.event.synchronize()

    def query(self) -> bool:
        return self.event.query()

    def elapsed_ms(self, end: "StreamEvent") -> float:
        return self.event.elapsed_time(end.event)


@functools.cache
def cuda_runtime():
    """cupy's CUDA runtime module, or None (no cupy, or none that loads)."""
    try:
        from cupy.cuda import runtime
    except Exception:
        return None
    return runtime
