"""Reading a peer's blocks over its UCX data plane: the remote tier's fast path (gRPC Fetch is the fallback).

Owns the reader's UCX sessions with holders and one request shape, a keyed get. It adds nothing to the
holder: there a session is the one a client of the tenant would get from DataPlane, issued instead by
PeerService.UcxSession to an admitted peer, so the holder pins, sends and unpins exactly as for any client
(kvstore/dataplane_ucx.py's OP_GET_KEYS) and its checks are the usual ones. It refuses policy: which holder,
which keys and what a failure means are the remote tier's (remote_tier.py).

Why: measured on the 2-core box, a client's UCX get moves 32 x 1 MiB at ~1.1 GB/s where gRPC streams ~0.2-0.3.
How: kvwire's client Worker, progressed by the calling thread (no event loop), one request at a time per
process (the worker's lock); a session per (holder incarnation, tenant), dropped on any failure (a transfer
that broke midway leaves the endpoint in an unknown state). A holder whose UCX failed is read over gRPC for
BROKEN_S. Payloads land in staging buffers, one per message group; the caller checks each block's checksum
before it stores it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvwire import ucx_wire as wire
from kvwire.errors import ERROR_TYPES, KVStoreError, TransferError, UnavailableError
from kvwire.ucxenv import Endpoint, Worker, import_ucxx
from kvstore.cluster.directory import HolderId
from kvstore.cluster.peers import Peers

log = logging.getLogger(__name__)

BROKEN_S = 5.0  # after a UCX failure with a holder, read it over gRPC this long
SESSION_TIMEOUT_S = 1.0
CHUNK_BYTES = 32 << 20  # payload one request asks for: what lands is stored before the next is asked (deadline runs)


@dataclass
class _Session:
    endpoint: Endpoint


def _refusal(detail: bytes) -> KVStoreError:
    name, _, message = detail.decode(errors="replace").partition(": ")
    err = ERROR_TYPES.get(name, TransferError)(f"holder's UCX data plane: {message or name}")
    err.refused_by_holder = True  # type: ignore[attr-defined]
    return err


class UcxFetcher:
    def __init__(self, peers: Peers) -> None:
        self.peers = peers
        self._sessions: dict[tuple[str, int, str], _Session] = {}
        self._broken: dict[HolderId, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        return import_ucxx() is not None

    def usable(self, holder: HolderId) -> bool:
        return self._broken.get(holder, 0.0) <= time.monotonic()

    def _broke(self, holder: HolderId) -> None:
        self._broken[holder] = time.monotonic() + BROKEN_S

    def _session(self, worker: Worker, holder: HolderId, tenant: str, deadline: float) -> _Session:
        """The session for (holder incarnation, tenant), opened (and said hello on) if there is none. Worker lock held."""
        key = (holder[0], holder[1], tenant)
        session = self._sessions.get(key)
        if session is not None:
            return session
        for old in [k for k in self._sessions if k[0] == holder[0] and k[1] != holder[1]]:
            self._sessions.pop(old).endpoint.abort()  # the holder restarted: its old incarnation's endpoints are dead
        listener, token, client_id = self.peers.ucx_session(holder[0], tenant, min(SESSION_TIMEOUT_S, max(0.001, deadline - time.monotonic())))
        if not listener:
            raise UnavailableError(f"node {holder[0]} runs no UCX data plane")
        host, port = listener.rsplit(":", 1)
        endpoint = Endpoint(worker, host, int(port), deadline)
        try:
            ident, bound = client_id.encode(), tenant.encode()
            reply = wire.empty_header()
            worker.wait([endpoint.send(wire.header(wire.OP_HELLO, len(ident), len(token), len(bound))),
                         endpoint.send(np.frombuffer(ident + token + bound, dtype=np.uint8)), endpoint.recv(reply)], deadline)
            if int(reply[0]) != wire.STATUS_OK or not int(reply[1]):
                raise TransferError(f"node {holder[0]}'s UCX data plane refused the peer session")
        except BaseException:
            endpoint.abort()
            raise
        session = self._sessions[key] = _Session(endpoint)
        return session

    def _drop(self, holder: HolderId, tenant: str) -> None:
        session = self._sessions.pop((holder[0], holder[1], tenant), None)
        if session is not None:
            session.endpoint.abort()

    def get(self, holder: HolderId, tenant: str, fingerprint_id: bytes, keys: list[bytes], sizes: list[int],
            deadline: float, into: list[Any] | None = None) -> tuple[list[memoryview], list[int]]:
        """The blocks of keys (all of them: the holder pins all or refuses) and the holder's checksums, unchecked.

        into: a buffer per block to receive it in place (slots of this node's pool: one message a block, no
        staging); else they land in staging buffers, small blocks packed into shared messages.
        Raises the holder's refusal as its own error type (BlockNotFoundError when one is missing: nothing
        moved), TransferError or UnavailableError for anything else (the holder is then read over gRPC a while)."""
        worker = Worker.get()
        n = len(keys)
        group_bytes = 0 if into is not None else wire.GROUP_BYTES
        body = b"".join([fingerprint_id, *keys])
        head = np.array([wire.OP_GET_KEYS, n, group_bytes, len(body), *sizes, *map(len, keys)], dtype=np.uint64)
        if wire.keyed_get_inline(n, len(body)):
            request = [np.frombuffer(head.tobytes() + body, dtype=np.uint8)]
        else:
            request = [head[: wire.HEADER_WORDS], head[wire.HEADER_WORDS :], np.frombuffer(body, dtype=np.uint8)]
        groups = wire.message_groups(sizes, group_bytes)
        buffers = into if into is not None else [np.empty(sum(sizes[g.start : g.stop]), dtype=np.uint8) for g in groups]
        reply = np.empty(wire.HEADER_WORDS + n, dtype=np.uint64)
        if not worker.lock.acquire(timeout=max(0.001, deadline - time.monotonic())):
            raise TransferError("the UCX worker stayed busy until the fetch deadline")
        try:
            session = self._session(worker, holder, tenant, deadline)
            ep = session.endpoint
            receives: list[Any] = [ep.recv(b, tag=wire.DATA_TAG) for b in buffers]
            answer = ep.recv(reply)
            worker.wait([answer, *[ep.send(m) for m in request]], deadline)
            if int(reply[0]) != wire.STATUS_OK:
                detail = np.empty(int(reply[3]), dtype=np.uint8)
                worker.wait([ep.recv(detail)], deadline)
                raise _refusal(detail.tobytes())
            worker.wait(receives, deadline)
        except KVStoreError as err:
            self._drop(holder, tenant)  # its payload receives are still posted: never reuse the endpoint
            if not getattr(err, "refused_by_holder", False):
                self._broke(holder)
            raise
        except Exception as err:
            self._drop(holder, tenant)
            self._broke(holder)
            raise TransferError(f"UCX read from node {holder[0]} failed: {type(err).__name__}: {err}") from None
        finally:
            worker.lock.release()
        views: list[memoryview] = []
        for g, buf in zip(groups, buffers):
            pos, mem = 0, memoryview(buf)
            for i in g:
                views.append(mem[pos : pos + sizes[i]])
                pos += sizes[i]
        return views, [int(c) for c in reply[wire.HEADER_WORDS :]]

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        if sessions:
            worker = Worker.get()
            with worker.lock:
                for session in sessions:
                    session.endpoint.abort()
