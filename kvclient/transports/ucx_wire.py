"""The UCX data plane's wire format, shared by kvstore/dataplane_ucx.py and kvclient/transports/ucx.py.

Control stays on gRPC (Reserve/Commit, Pin); over UCX a client only says which
pinned blocks to send or which reserved slots it is about to fill, in fixed-size
u64 headers, then the payloads follow as one tagged message per block straight
from/into the host pool. Every request gets one reply header; an error reply is
followed by one message carrying "ErrorType: detail" in UTF-8.
"""
from __future__ import annotations

import numpy as np

HEADER_WORDS = 4

OP_HELLO = 1  # [op, len(client_id), len(token), 0] + client_id bytes + token bytes
OP_GET = 2    # [op, n_blocks, pin_id, 0]; reply, then the n slots in pin order
OP_PUT = 3    # [op, n_blocks, 0, 0] + u64[n] lease ids; reply, then the client sends n payloads, then a final reply

STATUS_OK = 0
STATUS_ERROR = 1


def header(*words: int) -> np.ndarray:
    out = np.zeros(HEADER_WORDS, dtype=np.uint64)
    out[: len(words)] = words
    return out


def empty_header() -> np.ndarray:
    return np.zeros(HEADER_WORDS, dtype=np.uint64)


def error_detail(err: BaseException) -> bytes:
    return f"{type(err).__name__}: {err}".encode()
