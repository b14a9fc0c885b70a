"""The UCX data plane's wire format, shared by kvstore/dataplane_ucx.py and kvclient/transports/ucx.py.

Control stays on gRPC (Reserve/Commit, and Pin where the caller gives no output
buffers); over UCX a client says which keys to pin and send (OP_GET_KEYS: the pin
lives only for the request, so a get is one UCX round trip and no gRPC one), which
pinned blocks to send, or which reserved slots it is filling, in u64 headers on
the endpoint's default tag. Payloads travel on DATA_TAG, posted all at
once without waiting for a go-ahead, so a request costs one UCX round trip.
Every request gets one reply header; an error reply is followed by one message
carrying "ErrorType: detail" in UTF-8.

Payload messages: blocks of a call, in call order, packed by message_groups(). A
large block is one message straight from/into its buffer (zero-copy); small blocks
share a message, staged through one copy on each side, because a UCX message costs
tens of microseconds of Python and thread hand-offs whatever its size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from kvwire.blockcopy import runs_within

HEADER_WORDS = 4

OP_HELLO = 1  # [op, len(client_id), len(token), len(metadata)] + client_id + token + gRPC metadata (JSON pairs); reply word 1: HELLO_* bits
OP_GET = 2    # [op, n_blocks, pin_id, group_bytes]; the server sends the slots on DATA_TAG, then the reply
OP_PUT = 3    # [op, n_blocks, group_bytes, 0] + u64[2n] lease ids then sizes; the payloads on DATA_TAG follow at once; reply
OP_GET_KEYS = 4  # [op, n_blocks, group_bytes, body bytes] + u64[2n] expected sizes then key lengths + body: fingerprint_id, keys;
                 # one message when it fits in REQUEST_BYTES (inline), else header, then u64s, then body. The server
                 # pins, replies u64[4 + n] ([status, n, bytes, detail length] + checksums), sends the slots, unpins

OP_MASK = 0xFF  # a request's op word: the op in the low byte, FLAG_* bits above it
FLAG_FROM_HBM = 1 << 8  # on OP_GET / OP_GET_KEYS: the client lands in GPU memory, so send each block's HBM copy where it
                        # has one (GPU to GPU through UCX's CUDA transports); only when the hello offered HELLO_HBM_SENDS
HELLO_KEYED_GETS = 1  # hello reply word 1: the server pins by key inside a get (OP_GET_KEYS)
HELLO_HBM_SENDS = 2   # hello reply word 1: the server has an HBM tier it can send from (FLAG_FROM_HBM is honoured)
REQUEST_BYTES = 64 << 10  # the server receives every request header into this much: a small request is one message,
                          # since each further sequential receive costs a hand-off between UCX's threads and the loop
DATA_TAG = 1  # payload messages; headers and replies use the endpoint's default tag

GROUP_BYTES = 1 << 20       # blocks smaller than this share messages of up to this size
MAX_GROUP_BYTES = 16 << 20  # the server's cap on a client's group_bytes: bounds its staging buffers

STATUS_OK = 0
STATUS_ERROR = 1


def header(*words: int) -> np.ndarray:
    out = np.zeros(HEADER_WORDS, dtype=np.uint64)
    out[: len(words)] = words
    return out


def keyed_get_inline(count: int, body_bytes: int) -> bool:
    """Whether an OP_GET_KEYS request travels as one message (both sides decide alike from its header)."""
    return 8 * (HEADER_WORDS + 2 * count) + body_bytes <= REQUEST_BYTES


def empty_header() -> np.ndarray:
    return np.zeros(HEADER_WORDS, dtype=np.uint64)


def error_detail(err: BaseException) -> bytes:
    return f"{type(err).__name__}: {err}".encode()


def message_groups(sizes: Sequence[int], group_bytes: int) -> list[range]:
    """Runs of consecutive blocks that travel as one message; both sides compute the same runs from the same sizes.

    Blocks are packed greedily while the message stays within group_bytes; a block of
    group_bytes or more (every block, when group_bytes is 0) is a message of its own.
    """
    return runs_within(sizes, group_bytes)


def contiguous(offsets: Sequence[int], sizes: Sequence[int]) -> bool:
    """True when the slots follow each other in the pool, so one view spans them all."""
    return all(offsets[i] + sizes[i] == offsets[i + 1] for i in range(len(offsets) - 1))
