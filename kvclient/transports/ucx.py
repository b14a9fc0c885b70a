"""UCX transport for remote clients: tagged transfers straight between the server's pool and the caller's buffers.

The control plane stays on the control channel (Reserve/Commit, Pin; KVClient runs
them). Over one UCX endpoint per client the server then sends the pinned slots
(read) or receives into the reserved slots (write). A get into caller buffers skips
the Pin where the server knows our tenant (read_keys, keyed gets: the server pins,
sends and unpins inside the one UCX request, a control round trip and a thread hop less).
One UCX round trip per call, every payload message in flight at once, a large block straight from/into the caller's buffer, small
blocks packed into shared messages (ucx_wire.message_groups). Destinations may be
host buffers or, with CUDA-aware UCX, GPU arrays (cupy or torch CUDA tensors):
UCX writes them directly, without host staging, one message per block.

The calling thread posts a request's messages and progresses the process's UCX
worker itself until they complete (ucxenv.Worker: no progress thread, no event
loop, no task per message), checking each landed block while the rest are in
flight. Clients in one process take turns on the worker; the time spent waiting
for it is the "queue" part of TransferStats.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from kvclient.errors import ERROR_TYPES, KVStoreError, TransferError, UnavailableError
from kvclient.integrity import check_block
from kvclient.transports import device
from kvclient.transports.base import SlotRef, TransferStats, Transport, destinations
from kvwire import ucx_wire as wire
from kvwire.ucxenv import Endpoint, Worker, import_ucxx, unavailable_reason


def _raise_remote(detail: bytes) -> None:
    name, _, message = detail.decode(errors="replace").partition(": ")
    err = ERROR_TYPES.get(name, TransferError)(f"UCX data plane: {message or name}")
    err.refused_by_server = True  # type: ignore[attr-defined]
    raise err


class UcxTransport(Transport):
    name = "ucx"
    moves_device_memory = True
    releases_pins_on_read = True  # the server drops the pin as soon as it has sent the slots: one control call fewer per get

    def __init__(self, host: str, port: int, client_id: str, token: bytes, timeout_s: float, tenant: str = "") -> None:
        if import_ucxx() is None:
            raise UnavailableError(f"ucxx not importable: {unavailable_reason()}")
        try:
            self.worker = Worker.get()
        except Exception as err:
            raise UnavailableError(f"UCX worker did not start: {type(err).__name__}: {err}") from None
        self.host, self.port = host, port
        self.client_id, self.token, self.tenant = client_id, token, tenant
        self.timeout_s = timeout_s
        self._ep: Endpoint | None = None
        self._keyed = False  # the server pins by key inside a get (the hello bound our tenant)
        self._lock = threading.Lock()  # requests on one endpoint are strictly sequential
        with self._lock:  # connect now, so a client that cannot use UCX falls back at once
            self._request(lambda ep, deadline: None, TransferStats(), keep_on_refusal=False, timeout_s=min(timeout_s, 15))

    # ---- connection ---------------------------------------------------------------

    def _open(self, deadline: float) -> Endpoint:
        """Connect and say hello; the session token binds tenant and client id (the bearer token never crosses UCX, which is not encrypted)."""
        try:
            ep = Endpoint(self.worker, self.host, self.port, deadline)
        except Exception as err:
            raise UnavailableError(f"cannot reach the UCX listener at {self.host}:{self.port}: {type(err).__name__}: {err}") from None
        ident, tenant = self.client_id.encode(), self.tenant.encode()
        try:
            hello = [ep.send(wire.header(wire.OP_HELLO, len(ident), len(self.token), len(tenant))),
                     ep.send(np.frombuffer(ident + self.token + tenant, dtype=np.uint8))]
            self._keyed = bool(self._expect_ok(ep, hello, deadline)[1])
        except KVStoreError:
            ep.abort()
            raise
        except Exception as err:
            ep.abort()
            raise UnavailableError(f"UCX hello to {self.host}:{self.port} failed: {type(err).__name__}: {err}") from None
        return ep

    def _expect_ok(self, ep: Endpoint, sends: list, deadline: float) -> np.ndarray:
        """Wait for sends and the one-header reply; an error reply raises with the server's detail."""
        reply = wire.empty_header()
        self.worker.wait([*sends, ep.recv(reply)], deadline)
        if int(reply[0]) != wire.STATUS_OK:
            self._raise_detail(ep, int(reply[1]), deadline)
        return reply

    def _raise_detail(self, ep: Endpoint, length: int, deadline: float) -> None:
        detail = np.empty(length, dtype=np.uint8)
        self.worker.wait([ep.recv(detail)], deadline)
        _raise_remote(detail.tobytes())

    def _request(self, exchange: Callable[[Endpoint, float], None], stats: TransferStats, keep_on_refusal: bool,
                 timeout_s: float | None = None) -> None:
        """Run one exchange on the endpoint with the process's worker held; a transfer that fails midway
        leaves the endpoint in an unknown state, so drop it (its pending receives are cancelled with it).

        keep_on_refusal: the server answered a refusal and consumed everything sent, so the endpoint is in step.
        """
        limit_s = timeout_s or self.timeout_s
        submitted, deadline = time.perf_counter(), time.monotonic() + limit_s
        if not self.worker.lock.acquire(timeout=limit_s):
            raise TransferError(f"UCX worker busy for {limit_s:.0f}s")
        try:
            stats.queue_s += time.perf_counter() - submitted
            if self._ep is None:
                self._ep = self._open(deadline)
            exchange(self._ep, deadline)
        except KVStoreError as err:
            if not (keep_on_refusal and getattr(err, "refused_by_server", False)):
                self._drop_locked()
            raise
        except TimeoutError:
            self._drop_locked()
            raise TransferError(f"UCX transfer did not finish within {limit_s:.0f}s") from None
        except Exception as err:
            self._drop_locked()
            raise TransferError(f"UCX transfer failed: {type(err).__name__}: {err}") from None
        except BaseException:  # e.g. KeyboardInterrupt: receives still posted must not land in later calls' buffers
            self._drop_locked()
            raise
        finally:
            self.worker.lock.release()

    def _drop_locked(self) -> None:
        ep, self._ep = self._ep, None
        if ep is not None:
            ep.abort()

    @property
    def keyed_get(self) -> bool:
        """read_keys works: the server pins by key inside a get (the hello bound our tenant)."""
        return self._keyed

    # ---- data ---------------------------------------------------------------------

    def write(self, keys, slots: Sequence[SlotRef], payloads, stats: TransferStats) -> None:
        sizes = [s.size_bytes for s in slots]
        group_bytes = 0 if any(device.is_device(payloads[s.index]) for s in slots) else wire.GROUP_BYTES
        messages = [_gather([payloads[slots[i].index] for i in g]) for g in wire.message_groups(sizes, group_bytes)]
        meta = np.array([s.handle for s in slots] + sizes, dtype=np.uint64)

        def send(ep: Endpoint, deadline: float) -> None:
            t0 = time.perf_counter()
            sends = [ep.send(wire.header(wire.OP_PUT, len(slots), group_bytes)), ep.send(meta)]
            sends += [ep.send(m, tag=wire.DATA_TAG) for m in messages]
            reply = self._expect_ok(ep, sends, deadline)
            stats.transfer_s += time.perf_counter() - t0
            if int(reply[2]) != sum(sizes):
                raise TransferError(f"server received {int(reply[2])} bytes, expected {sum(sizes)}")

        with self._lock:
            self._request(send, stats, keep_on_refusal=True)

    def read_keys(self, fingerprint_id: bytes, keys, outs, stats: TransferStats) -> list[Any]:
        """One UCX round trip: the server pins the keys, replies with their checksums, sends the slots and drops the pin.

        Receives for the reply and every payload are posted before the request goes out,
        straight into the caller's buffers (their sizes are the expected block sizes).
        """
        n = len(keys)
        dests = destinations([SlotRef(i, 0, device.nbytes(o)) for i, o in enumerate(outs)], outs, keys)
        sizes = [device.nbytes(d) for d in dests]
        group_bytes, groups, buffers = _receive_plan(sizes, dests)
        body = b"".join([fingerprint_id, *keys])
        head = np.array([wire.OP_GET_KEYS, n, group_bytes, len(body)] + sizes + [len(k) for k in keys], dtype=np.uint64)
        if wire.keyed_get_inline(n, len(body)):
            request = [np.frombuffer(head.tobytes() + body, dtype=np.uint8)]
        else:
            request = [head[: wire.HEADER_WORDS], head[wire.HEADER_WORDS :], np.frombuffer(body, dtype=np.uint8)]
        reply = np.empty(wire.HEADER_WORDS + n, dtype=np.uint64)
        checksums: list[int] = []

        def reply_landed(ep: Endpoint, deadline: float) -> None:
            if int(reply[0]) != wire.STATUS_OK:
                self._raise_detail(ep, int(reply[3]), deadline)  # the endpoint is then dropped, which cancels the receives
            checksums[:] = [int(c) for c in reply[wire.HEADER_WORDS :]]

        def receive(ep: Endpoint, deadline: float) -> None:
            _receive(self.worker, ep, deadline, buffers, reply, [ep.send(m) for m in request], reply_landed,
                     lambda g, buf: _verify(keys, g, buf, dests, sizes, checksums), groups, stats)

        with self._lock:
            self._request(receive, stats, keep_on_refusal=False)
        stats.bytes += sum(sizes)
        stats.blocks += n
        return dests

    def read(self, keys, slots: Sequence[SlotRef], dests, stats: TransferStats, ahead=None) -> None:
        """The server sends the pinned slots (one pin: slots[0].handle), then drops the pin."""
        sizes = [s.size_bytes for s in slots]
        group_bytes, groups, buffers = _receive_plan(sizes, dests)
        block_keys = [keys[s.index] for s in slots]
        checksums = [s.checksum for s in slots]
        reply = wire.empty_header()

        def reply_landed(ep: Endpoint, deadline: float) -> None:
            if int(reply[0]) != wire.STATUS_OK:
                self._raise_detail(ep, int(reply[1]), deadline)  # the endpoint is then dropped, which cancels the receives

        def receive(ep: Endpoint, deadline: float) -> None:
            request = ep.send(wire.header(wire.OP_GET, len(slots), slots[0].handle, group_bytes))
            _receive(self.worker, ep, deadline, buffers, reply, [request], reply_landed,
                     lambda g, buf: _verify(block_keys, g, buf, dests, sizes, checksums), groups, stats)

        with self._lock:
            self._request(receive, stats, keep_on_refusal=False)

    def close(self) -> None:
        with self._lock:
            if self._ep is not None:
                with self.worker.lock:
                    self._drop_locked()


def _receive(worker: Worker, ep: Endpoint, deadline: float, buffers: list, reply: np.ndarray, sends: list,
             reply_landed: Callable[[Endpoint, float], None], verify: Callable[[range, Any], None], groups: list[range],
             stats: TransferStats) -> None:
    """Post the payload receives and the reply's, then check each message as it lands: hashing overlaps the rest.

    Receives are posted before the request goes out (sends come after them), so payloads
    land in place, never in UCX's unexpected queue. Messages that land before the reply
    (which carries the checksums of a keyed get) are checked once it is in.
    """
    t0, validated = time.perf_counter(), 0.0
    requests = [ep.recv(b, tag=wire.DATA_TAG) for b in buffers]
    requests.append(ep.recv(reply))
    requests += sends
    n, replied, early = len(buffers), False, []
    for i in worker.completions(requests, deadline):
        if i > n:
            continue  # one of the request's sends
        if i == n:
            reply_landed(ep, deadline)
            replied, ready = True, early
        elif not replied:
            early.append(i)
            continue
        else:
            ready = [i]
        t1 = time.perf_counter()
        for j in ready:
            verify(groups[j], buffers[j])
        validated += time.perf_counter() - t1
    stats.validate_s += validated
    stats.transfer_s += time.perf_counter() - t0 - validated


def _receive_plan(sizes: list[int], dests: list[Any]) -> tuple[int, list[range], list[Any]]:
    """How a get's blocks arrive: group size, message groups, and the buffer each message lands in
    (the caller's own for a lone block, staging for a packed run of small ones)."""
    group_bytes = 0 if any(device.is_device(d) for d in dests) else wire.GROUP_BYTES
    groups = wire.message_groups(sizes, group_bytes)
    buffers = [dests[g.start] if len(g) == 1 else np.empty(sum(sizes[g.start : g.stop]), dtype=np.uint8) for g in groups]
    return group_bytes, groups, buffers


def _verify(keys, g: range, buf: Any, dests: list[Any], sizes: list[int], checksums: list[int]) -> None:
    """Check one landed message's blocks; a packed message's blocks are checked in staging, then copied out while in cache."""
    if len(g) == 1:
        check_block(keys[g.start], device.host_bytes(buf), checksums[g.start])
        return
    pos = 0
    for i in g:
        piece = buf[pos : pos + sizes[i]]
        check_block(keys[i], piece, checksums[i])
        np.copyto(dests[i], piece)
        pos += sizes[i]


def _gather(payloads: list[Any]) -> Any:
    """One message's bytes: the payload itself, or several small ones copied into one buffer."""
    if len(payloads) == 1:
        return payloads[0]
    return np.concatenate([np.frombuffer(p, dtype=np.uint8) for p in payloads])
