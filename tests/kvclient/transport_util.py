"""Helpers for the transport tests: which transports can run here, a server for them, a mapped pool."""
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np
import pytest

from kvwire.ucxenv import import_ucxx

HAVE_UCX = import_ucxx() is not None
# The server gets only tcp+self, so a UCX pair on one host must really go over loopback TCP, not shared memory.
# Its listen address is loopback, where UCX stays off unless allowed to listen on every interface (ucxx can do no less).
UCX_SERVER_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "KVSTORE_UCX_ALL_INTERFACES": "true"}

TRANSPORTS = [
    "grpc",
    "shm",
    pytest.param("ucx", marks=[pytest.mark.ucx, pytest.mark.skipif(not HAVE_UCX, reason="ucxx not importable")]),
]


def random_blocks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def assert_all_equal(got, want) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert np.array_equal(a, b), f"block {i} differs"


def tokens(n_blocks: int, start: int = 0, block_tokens: int = 16) -> list[int]:
    return list(range(start, start + n_blocks * block_tokens))


def map_pool(shm_name: str) -> np.ndarray:
    """The server's host pool, mapped read-write from a test (to corrupt a slot on purpose)."""
    path = Path("/dev/shm") / shm_name
    fd = os.open(path, os.O_RDWR)
    try:
        return np.frombuffer(mmap.mmap(fd, os.fstat(fd).st_size), dtype=np.uint8)
    finally:
        os.close(fd)


def proc_io_bytes(pid: int) -> int:
    """Bytes a process moved through read/write-family syscalls (sockets included): rchar + wchar."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def eventually(predicate, timeout_s: float = 5.0) -> None:
    """Poll until predicate() holds. For what the server finishes just after answering: a pin dropped
    once its sends completed or failed, a deferred or a reaped one."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached in {timeout_s} s"
        time.sleep(0.05)
