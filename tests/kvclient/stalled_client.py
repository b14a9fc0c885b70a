"""A client process that stops dead in the middle of a transfer, for tests that then SIGKILL it.

    python -m tests.kvclient.stalled_client ADDRESS TRANSPORT OP N_BLOCKS BLOCK_BYTES

OP "put-filled": the payload is in the reserved slots but Commit never comes.
OP "get-pinned": the blocks are pinned but nothing is copied out yet.
OP "get-midway": the first block has landed, the rest never do (shm: one copy done;
ucx: the server has sent, the client stops before validating).
It prints "STALLED" when it reaches that point, then sleeps until killed.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np

from kvclient import KVClient
from kvclient.transports import shm, ucx
from tests.conftest import make_fingerprint


_stalled = threading.Lock()


def stall() -> None:
    """Say STALLED once (several copy threads may get here) and hang."""
    if _stalled.acquire(blocking=False):
        print("STALLED", flush=True)
    time.sleep(3600)


def main(address: str, transport: str, op: str, n_blocks: int, block_bytes: int) -> None:
    client = KVClient(address, make_fingerprint(), tenant="stalled", transport=transport)
    keys = client.block_keys(list(range(n_blocks * 16)))
    mover = type(client.transport)
    if op == "put-filled":
        real_write = mover.write

        def write(self, *args, **kwargs):
            real_write(self, *args, **kwargs)
            stall()

        mover.write = write
        client.put(keys, [np.full(block_bytes, i % 251, np.uint8) for i in range(n_blocks)])
    elif op == "get-pinned":
        mover.read = lambda *a, **k: stall()
        client.get(keys)
    elif op == "get-midway":
        seen = []

        real_copy = shm.ShmTransport._copy_checked

        def copy_one_then_stall(self, slots, dests):
            real_copy(self, slots[:1], dests[:1])
            stall()

        real_verify = ucx._verify

        def verify_one_then_stall(keys, g, *args):
            if seen:
                stall()
            seen.append(g)
            real_verify(keys, g, *args)

        ucx._verify = verify_one_then_stall
        shm.ShmTransport._copy_checked = copy_one_then_stall
        client.get(keys)
    print("DONE", flush=True)  # never reached when killed


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
