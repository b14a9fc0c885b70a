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
from kvclient.integrity import check_block, checksum_error
from kvclient.transports import device
from kvclient.transports.base import SlotRef, TransferStats, Transport, destinations
from kvwire import ucx_wire as wire
from kvwire.blockcopy import HASH_DEST, HASH_SOURCE, checksums, copy_blocks, packed_offsets
from kvwire.ucxenv import Endpoint, Worker, import_ucxx, unavailable_reason


def _raise_remote(detail: bytes) -> None:
    name, _, message = detail.decode(errors="replace").partition(": ")
    err = ERROR_TYPES.get(name, TransferError)(f"UCX data plane: {message or name}")
    err.refused_by_server = True  # type: ignore[attr-defined]
    raise err


class UcxTransport(Transport):
    name = "ucx"
    releases_pins_on_read = True  # the server drops the pin as soon as it has sent the slots: one control call fewer per get
    hashes_while_writing = True  # small blocks hashed as they are packed, the others in one call: no per-block pass in put()

    def __init__(self, host: str, port: int, client_id: str, token: bytes, timeout_s: float, tenant: str = "") -> None:
        if import_ucxx() is None:
            raise UnavailableError(f"ucxx not importable: {unavailable_reason()}")
        try:
            self.worker = Worker.get()
        except Exception as err:
            raise UnavailableError(f"UCX worker did not start: {type(err).__name__}: {err}") from None
        # GPU buffers go to UCX as they are only where its context can move them (UCX_TLS with cuda_copy / cuda_ipc);
        # elsewhere they are refused with an error saying so, and engines stage them through host memory.
        self.moves_device_memory = self.worker.cuda_support
        self.host, self.port = host, port
        self.client_id, self.token, self.tenant = client_id, token, tenant
        self.timeout_s = timeout_s
        self._ep: Endpoint | None = None
        self._keyed = False  # the server pins by key inside a get (the hello bound our tenant)
        self._hbm_sends = False  # the server offers to send blocks from their HBM copies (FLAG_FROM_HBM)
        # Whether a get asks for blocks' HBM copies: None, when it lands in GPU memory (GPU to GPU, where UCX's CUDA
        # transports are on both sides); True or False, always or never (a get landing in host memory gains nothing).
        self.prefer_hbm: bool | None = None
        self._lock = threading.Lock()  # requests on one endpoint are strictly sequential
        self._staging = Staging()  # packed messages of the request in flight (one at a time: the lock)
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
            offers = int(self._expect_ok(ep, hello, deadline)[1])
            self._keyed, self._hbm_sends = bool(offers & wire.HELLO_KEYED_GETS), bool(offers & wire.HELLO_HBM_SENDS)
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

    @property
    def hbm_sends(self) -> bool:
        """The server sends blocks' HBM copies to gets that ask (prefer_hbm): it has an HBM tier its UCX can read."""
        return self._hbm_sends

    # ---- data ---------------------------------------------------------------------

    def write(self, keys, slots: Sequence[SlotRef], payloads, stats: TransferStats) -> list[int]:
        """Send every payload into its reserved slot; returns each block's checksum (hashes_while_writing), taken as
        small blocks are packed into their messages and, for blocks sent from the caller's buffer, in one call."""
        sizes = [s.size_bytes for s in slots]
        sources = [payloads[s.index] for s in slots]
        on_device = any(device.is_device(p) for p in sources)
        group_bytes = 0 if on_device else wire.GROUP_BYTES
        groups = wire.message_groups(sizes, group_bytes)
        meta = np.array([s.handle for s in slots] + sizes, dtype=np.uint64)
        messages: list[Any] = []

        def send(ep: Endpoint, deadline: float) -> None:
            t0 = time.perf_counter()
            sends = [ep.send(wire.header(wire.OP_PUT, len(slots), group_bytes)), ep.send(meta)]
            sends += [ep.send(m, tag=wire.DATA_TAG) for m in messages]
            reply = self._expect_ok(ep, sends, deadline)
            stats.transfer_s += time.perf_counter() - t0
            if int(reply[2]) != sum(sizes):
                raise TransferError(f"server received {int(reply[2])} bytes, expected {sum(sizes)}")

        with self._lock:  # the staging is the transport's, one request at a time
            t0 = time.perf_counter()
            if on_device:
                messages, digests = list(sources), [device.checksum(p) for p in sources]
            else:
                messages, digests = self._pack(groups, sources, sizes)
            stats.validate_s += time.perf_counter() - t0
            self._request(send, stats, keep_on_refusal=True)
        return digests

    def _pack(self, groups: list[range], sources: list[Any], sizes: list[int]) -> tuple[list[Any], list[int]]:
        """The messages of a put from host buffers and each block's checksum: runs of small blocks copied into staging
        in one call, hashed as they are read; a lone block is its own message, hashed in one call with the others."""
        packed = [i for g in groups if len(g) > 1 for i in g]
        lone = [g.start for g in groups if len(g) == 1]
        digests = [0] * len(sizes)
        packed_sizes = [sizes[i] for i in packed]
        staging = self._staging.take(sum(packed_sizes))
        for i, d in zip(packed, copy_blocks([sources[i] for i in packed], None, staging, packed_offsets(packed_sizes), packed_sizes, HASH_SOURCE)):
            digests[i] = d
        for i, d in zip(lone, checksums([sources[i] for i in lone], None, [sizes[i] for i in lone])):
            digests[i] = d
        return _group_buffers(groups, sizes, sources, staging), digests

    def read_keys(self, fingerprint_id: bytes, keys, outs, stats: TransferStats) -> list[Any]:
        """One UCX round trip: the server pins the keys, replies with their checksums, sends the slots and drops the pin.

        Receives for the reply and every payload are posted before the request goes out,
        straight into the caller's buffers (their sizes are the expected block sizes).
        """
        n = len(keys)
        dests = destinations([SlotRef(i, 0, device.nbytes(o)) for i, o in enumerate(outs)], outs, keys)
        sizes = [device.nbytes(d) for d in dests]
        group_bytes, groups = _receive_plan(sizes, dests)
        buffers: list[Any] = []
        body = b"".join([fingerprint_id, *keys])
        head = np.array([wire.OP_GET_KEYS | self._flags(group_bytes), n, group_bytes, len(body)] + sizes + [len(k) for k in keys], dtype=np.uint64)
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

        with self._lock:  # the staging is the transport's, one request at a time
            buffers[:] = _landing(groups, sizes, dests, self._staging)
            self._request(receive, stats, keep_on_refusal=False)
        stats.bytes += sum(sizes)
        stats.blocks += n
        return dests

    def read(self, keys, slots: Sequence[SlotRef], dests, stats: TransferStats, ahead=None) -> None:
        """The server sends the pinned slots (one pin: slots[0].handle), then drops the pin."""
        sizes = [s.size_bytes for s in slots]
        group_bytes, groups = _receive_plan(sizes, dests)
        buffers: list[Any] = []
        block_keys = [keys[s.index] for s in slots]
        checksums = [s.checksum for s in slots]
        reply = wire.empty_header()

        def reply_landed(ep: Endpoint, deadline: float) -> None:
            if int(reply[0]) != wire.STATUS_OK:
                self._raise_detail(ep, int(reply[1]), deadline)  # the endpoint is then dropped, which cancels the receives

        def receive(ep: Endpoint, deadline: float) -> None:
            request = ep.send(wire.header(wire.OP_GET | self._flags(group_bytes), len(slots), slots[0].handle, group_bytes))
            _receive(self.worker, ep, deadline, buffers, reply, [request], reply_landed,
                     lambda g, buf: _verify(block_keys, g, buf, dests, sizes, checksums), groups, stats)

        with self._lock:
            buffers[:] = _landing(groups, sizes, dests, self._staging)
            self._request(receive, stats, keep_on_refusal=False)

    def _flags(self, group_bytes: int) -> int:
        """A get's FLAG_* bits: FLAG_FROM_HBM where the server offers it and the get wants it (prefer_hbm; by default
        when it lands in GPU memory, which _receive_plan marks with group_bytes 0)."""
        wanted = group_bytes == 0 if self.prefer_hbm is None else self.prefer_hbm
        return wire.FLAG_FROM_HBM if wanted and self._hbm_sends else 0

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


def _receive_plan(sizes: list[int], dests: list[Any]) -> tuple[int, list[range]]:
    """How a get's blocks arrive: group size and message groups (one message per block into GPU memory)."""
    group_bytes = 0 if any(device.is_device(d) for d in dests) else wire.GROUP_BYTES
    return group_bytes, wire.message_groups(sizes, group_bytes)


def _landing(groups: list[range], sizes: list[int], dests: list[Any], staging: "Staging") -> list[Any]:
    """The buffer each message lands in: the caller's own for a lone block, a piece of the staging for a packed run."""
    area = staging.take(sum(sum(sizes[g.start : g.stop]) for g in groups if len(g) > 1))
    return _group_buffers(groups, sizes, dests, area)


def _group_buffers(groups: list[range], sizes: list[int], own: Sequence[Any], area: Any) -> list[Any]:
    """One buffer per message, in order: a lone block's own buffer, or the next piece of area for a packed run
    (a send's staged blocks, a receive's landing area)."""
    buffers, pos = [], 0
    for g in groups:
        if len(g) == 1:
            buffers.append(own[g.start])
            continue
        n = sum(sizes[g.start : g.stop])
        buffers.append(area[pos : pos + n])
        pos += n
    return buffers


def _verify(keys, g: range, buf: Any, dests: list[Any], sizes: list[int], checksums: list[int]) -> None:
    """Check one landed message's blocks: a lone block where it landed; a packed message's blocks copied out
    to their buffers in one call, each hashed right after its copy, while in cache."""
    if len(g) == 1:
        check_block(keys[g.start], device.host_bytes(buf), checksums[g.start])
        return
    group_sizes = sizes[g.start : g.stop]
    digests = copy_blocks(buf, packed_offsets(group_sizes), dests[g.start : g.stop], None, group_sizes, HASH_DEST)
    bad = [i for i, d in zip(g, digests) if d != checksums[i]]
    if bad:
        raise checksum_error(keys[bad[0]], len(bad), len(g))


class Staging:
    """One transport's staging for packed messages, kept between calls: a fresh buffer a call faulted in page by page
    (~8k faults for 32 MiB), which cost a 64 KiB-block get as much as its copies. Requests on a transport are
    sequential (its lock), so one area serves them all; one larger than KEEP_BYTES is not kept."""

    KEEP_BYTES = 64 << 20

    def __init__(self) -> None:
        self._area = np.empty(0, dtype=np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes > len(self._area):
            area = np.empty(nbytes, dtype=np.uint8)
            if nbytes > self.KEEP_BYTES:
                return area
            self._area = area
        return self._area[:nbytes]
