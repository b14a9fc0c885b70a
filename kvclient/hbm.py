"""The server's HBM pool as this process maps it: one CUDA IPC mapping per process, opened at first use.

A same-host server with an HBM tier advertises its pool in DataPlane (device uuid, IPC handle, size,
pool id). Opening the handle maps the whole allocation into this process's address space on its own
ordinal of that GPU, so an engine copies pinned blocks device to device straight into its pages. It
is opened once per process and pool (a handle cannot be opened twice in one process, and each
mapping costs a driver call), shared by every KVClient of the process, and never closed: the
mapping lives as long as the process, and ends with it. It refuses to own what is copied: a
PinnedBlocks says which blocks are where (pins.py), the engine copies and checks them.

The handle is read from a file only the server's OS user can read (DataPlane names it): a CUDA IPC
handle is not checked against anyone's identity when it is opened, so it is guarded as the shared
host pool is, and a process of another user gets no mapping (and copies from the host tier).

What a process sees through the mapping once the server has died is not promised by CUDA; the
checksums the engine computes where the blocks landed are what stands between that and its pages.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from kvclient.control import DataPlaneInfo
from kvwire.hostid import host_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HbmPool:
    """The server's HBM pool mapped into this process: block bytes at base_ptr + a pin's hbm offset."""

    device: int  # this process's CUDA ordinal of the pool's GPU
    device_uuid: str
    base_ptr: int
    size_bytes: int
    pool_id: int  # the allocation's id: offsets of pins naming another id must not be used with this mapping


_lock = threading.Lock()
_opened: dict[int, HbmPool] = {}  # pool id -> this process's mapping
_failed: dict[int, str] = {}  # pool id -> why it could not be mapped (not retried)
_pid = os.getpid()


def open_hbm_pool(info: DataPlaneInfo | None) -> HbmPool | None:
    """This process's mapping of the pool info advertises, opened at the first call; None where there is
    none to map (another host, no HBM tier, an unshared one) or it cannot be mapped here (no cupy, no
    such GPU visible, the driver refused), which is then logged once at debug level."""
    global _pid
    if info is None or not info.hbm_handle_file or not info.hbm_size or info.host_id != host_id():
        return None
    with _lock:
        if _pid != os.getpid():  # a forked child has none of its parent's CUDA state
            _opened.clear()
            _failed.clear()
            _pid = os.getpid()
        pool = _opened.get(info.hbm_pool_id)
        if pool is not None or info.hbm_pool_id in _failed:
            return pool
        try:
            pool = _map(info)
        except Exception as err:  # no cupy, no CUDA, the device is not visible, the handle is stale
            _failed[info.hbm_pool_id] = f"{type(err).__name__}: {err}"
            log.debug("kvclient: not mapping the server's HBM pool: %s", _failed[info.hbm_pool_id])
            return None
        _opened[info.hbm_pool_id] = pool
        return pool


def _map(info: DataPlaneInfo) -> HbmPool:
    import cupy
    from cupy.cuda import runtime

    from kvwire.deviceid import device_ordinal

    with open(info.hbm_handle_file, "rb") as f:  # PermissionError for another user: no mapping
        handle = f.read()
    device = device_ordinal(info.hbm_device_uuid)
    if device is None:
        raise LookupError(f"GPU {info.hbm_device_uuid} is not visible to this process (CUDA_VISIBLE_DEVICES?)")
    with cupy.cuda.Device(device):
        base = runtime.ipcOpenMemHandle(handle)  # cudaIpcMemLazyEnablePeerAccess: readable from other GPUs too
    return HbmPool(device, info.hbm_device_uuid, int(base), info.hbm_size, info.hbm_pool_id)
