"""Views over the buffers callers hand us (bytes, numpy arrays, CPU torch tensors), without copies.

torch is imported only when a tensor is actually passed, so the client works without it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvclient.errors import InvalidRequestError


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage")


def _torch_bytes(t: Any) -> np.ndarray:
    import torch

    if t.device.type != "cpu":
        raise InvalidRequestError(f"tensor on {t.device} given to a host-memory path; use a CPU tensor or a GPU-capable transport")
    if not t.is_contiguous():
        raise InvalidRequestError("tensor must be contiguous")
    return t.view(torch.uint8).reshape(-1).numpy() if t.numel() else np.empty(0, np.uint8)


def as_readable(obj: Any) -> memoryview:
    """A flat byte view of obj."""
    if _is_torch(obj):
        return memoryview(_torch_bytes(obj))
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise InvalidRequestError("numpy array must be C-contiguous")
        return memoryview(obj.reshape(-1).view(np.uint8))
    try:
        return memoryview(obj).cast("B")
    except TypeError as err:
        raise InvalidRequestError(f"cannot read a block from {type(obj).__name__}: need bytes-like, numpy or CPU torch") from err


def as_writable(obj: Any) -> memoryview:
    view = as_readable(obj)
    if view.readonly:
        raise InvalidRequestError(f"output buffer of type {type(obj).__name__} is read-only")
    return view
