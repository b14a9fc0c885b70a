"""UCX transport for remote clients: tagged transfers straight between the server's pool and the caller's buffers.

The control plane stays on gRPC (Reserve/Commit, Pin; see pooled.py). Over one
UCX endpoint per client the server then sends the pinned slots (get) or receives
into the reserved slots (put). A get into caller buffers skips the gRPC Pin where
the server knows our tenant (keyed gets: the server pins, sends and unpins inside
the one UCX request, a gRPC round trip and a thread hop less). One round trip per call, every payload message in
flight at once, a large block straight from/into the caller's buffer, small
blocks packed into shared messages (ucx_wire.message_groups). Destinations may be
host buffers or, with CUDA-aware UCX, GPU arrays (cupy or torch CUDA tensors):
UCX writes them directly, without host staging, one message per block.

ucxx's async API wants one asyncio loop per process; `UcxRuntime` runs it in a
daemon thread shared by every client in the process, and the synchronous
KVClient calls hand coroutines to it. ucxx's context is created on that thread
with completions as futures (ucxenv.start_context), so waiting costs no CPU. Time from hand-off to start is the
"queue" part of TransferStats.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Coroutine

import numpy as np

from kvclient.errors import ERROR_TYPES, CapacityExhaustedError, KVStoreError, TransferError, UnavailableError
from kvclient.transports import device, ucx_wire as wire
from kvclient.transports.base import TransferStats
from kvclient.transports.pooled import PoolControl, SlotRef, check_block, destinations
from kvclient.ucxenv import import_ucxx, start_context, unavailable_reason


class UcxRuntime:
    """The process's UCX event loop thread; created on first use."""

    _instance: "UcxRuntime | None" = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.ucxx = import_ucxx()
        if self.ucxx is None:
            raise UnavailableError(f"ucxx not importable: {unavailable_reason()}")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvclient-ucx", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start_context(), self.loop).result(30)
        except Exception as err:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise UnavailableError(f"UCX context did not start: {type(err).__name__}: {err}") from None

    async def _start_context(self) -> None:
        start_context(self.ucxx)

    @classmethod
    def get(cls) -> "UcxRuntime":
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro: Coroutine, timeout_s: float, stats: TransferStats | None = None) -> Any:
        submitted = time.perf_counter()

        async def timed():
            if stats is not None:
                stats.queue_s += time.perf_counter() - submitted
            return await asyncio.wait_for(coro, timeout_s)

        try:
            return asyncio.run_coroutine_threadsafe(timed(), self.loop).result(timeout_s + 5)
        except (asyncio.TimeoutError, TimeoutError):
            raise TransferError(f"UCX transfer did not finish within {timeout_s:.0f}s") from None


def _raise_remote(detail: bytes) -> None:
    name, _, message = detail.decode(errors="replace").partition(": ")
    err = ERROR_TYPES.get(name, TransferError)(f"UCX data plane: {message or name}")
    err.refused_by_server = True  # type: ignore[attr-defined]
    raise err


class UcxTransport:
    name = "ucx"
    moves_device_memory = True

    def __init__(self, control: PoolControl, host: str, port: int, client_id: str, token: bytes, timeout_s: float,
                 tenant: str = "") -> None:
        self.control = control
        self.host, self.port = host, port
        self.client_id, self.token, self.tenant = client_id, token, tenant
        self.timeout_s = timeout_s
        self.runtime = UcxRuntime.get()
        self._ep = None
        self._keyed = False  # the server pins by key inside a get (the hello bound our tenant)
        self._lock = threading.Lock()  # requests on one endpoint are strictly sequential
        with self._lock:
            self._connect_locked()

    # ---- connection ---------------------------------------------------------------

    def _connect_locked(self) -> None:
        try:
            self._ep = self.runtime.run(self._open(), min(self.timeout_s, 15))
        except KVStoreError:
            raise
        except Exception as err:
            raise UnavailableError(f"cannot reach the UCX listener at {self.host}:{self.port}: {type(err).__name__}: {err}") from None

    async def _open(self):
        ep = await self.runtime.ucxx.create_endpoint(self.host, self.port)
        ident, tenant = self.client_id.encode(), self.tenant.encode()
        # The session token binds tenant and client id; the bearer token never crosses UCX (not encrypted).
        await ep.send(wire.header(wire.OP_HELLO, len(ident), len(self.token), len(tenant)))
        await ep.send(np.frombuffer(ident + self.token + tenant, dtype=np.uint8))
        self._keyed = bool((await self._expect_ok(ep))[1])
        return ep

    async def _expect_ok(self, ep) -> np.ndarray:
        reply = wire.empty_header()
        await ep.recv(reply)
        if int(reply[0]) != wire.STATUS_OK:
            detail = np.empty(int(reply[1]), dtype=np.uint8)
            await ep.recv(detail)
            _raise_remote(detail.tobytes())
        return reply

    def _request(self, coro_fn, stats: TransferStats, keep_on_refusal: bool) -> None:
        """Run one request; a transfer that fails midway leaves the endpoint in an unknown state, so drop it.

        keep_on_refusal: the server answered a refusal and consumed everything sent, so the endpoint is in step.
        """
        with self._lock:
            if self._ep is None:
                self._connect_locked()
            try:
                self.runtime.run(coro_fn(self._ep), self.timeout_s, stats)
            except KVStoreError as err:
                if not (keep_on_refusal and getattr(err, "refused_by_server", False)):
                    self._drop_locked()
                raise
            except Exception as err:
                self._drop_locked()
                raise TransferError(f"UCX transfer failed: {type(err).__name__}: {err}") from None

    def _drop_locked(self) -> None:
        """Abort the endpoint: UCX cancels its outstanding requests, so no late message can land in a caller's buffer."""
        ep, self._ep = self._ep, None
        if ep is not None:
            self.runtime.loop.call_soon_threadsafe(ep.abort)

    # ---- data ---------------------------------------------------------------------

    def put(self, keys, payloads, checksums, durable: bool, stats: TransferStats) -> list[int]:
        def fill(slots: list[SlotRef]) -> None:
            sizes = [s.length for s in slots]
            group_bytes = 0 if any(device.is_device(payloads[s.index]) for s in slots) else wire.GROUP_BYTES
            messages = [_gather([payloads[slots[i].index] for i in g]) for g in wire.message_groups(sizes, group_bytes)]
            meta = np.array([s.handle for s in slots] + sizes, dtype=np.uint64)

            async def send(ep) -> None:
                t0 = time.perf_counter()
                sends = [ep.send(wire.header(wire.OP_PUT, len(slots), group_bytes)), ep.send(meta)]
                sends += [ep.send(m, tag=wire.DATA_TAG) for m in messages]
                *_, reply = await asyncio.gather(*sends, self._expect_ok(ep))
                stats.transfer_s += time.perf_counter() - t0
                if int(reply[2]) != sum(sizes):
                    raise TransferError(f"server received {int(reply[2])} bytes, expected {sum(sizes)}")

            self._request(send, stats, keep_on_refusal=True)

        return self.control.put(keys, payloads, checksums, durable, stats, fill)

    def get(self, keys, outs, stats: TransferStats) -> list[Any]:
        if outs is not None and keys and self._keyed:
            try:
                return self._get_keyed(keys, outs, stats)
            except CapacityExhaustedError:
                pass  # more than the host pool can stage at once: the gRPC path pins it in halves
        return self._get_pinned(keys, outs, stats)

    def _get_keyed(self, keys, outs, stats: TransferStats) -> list[Any]:
        """One UCX round trip: the server pins the keys, replies with their checksums, sends the slots and drops the pin.

        Receives for the reply and every payload are posted before the request goes out,
        straight into the caller's buffers (their sizes are the expected block sizes).
        """
        n = len(keys)
        dests = destinations([SlotRef(i, 0, device.nbytes(o)) for i, o in enumerate(outs)], outs, keys)
        sizes = [device.nbytes(d) for d in dests]
        group_bytes, groups, buffers = _receive_plan(sizes, dests)
        body = b"".join([self.control.fingerprint_id, *keys])
        head = np.array([wire.OP_GET_KEYS, n, group_bytes, len(body)] + sizes + [len(k) for k in keys], dtype=np.uint64)
        if wire.keyed_get_inline(n, len(body)):
            request = [np.frombuffer(head.tobytes() + body, dtype=np.uint8)]
        else:
            request = [head[: wire.HEADER_WORDS], head[wire.HEADER_WORDS :], np.frombuffer(body, dtype=np.uint8)]
        reply = np.empty(wire.HEADER_WORDS + n, dtype=np.uint64)

        async def receive(ep) -> None:
            t0, validated_before = time.perf_counter(), stats.validate_s
            landed = [_task(ep.recv(b, tag=wire.DATA_TAG)) for b in buffers]
            replied = _task(ep.recv(reply))
            await asyncio.sleep(0)
            await asyncio.gather(*(ep.send(m) for m in request))
            await replied
            if int(reply[0]) != wire.STATUS_OK:
                detail = np.empty(int(reply[3]), dtype=np.uint8)
                await ep.recv(detail)
                _raise_remote(detail.tobytes())  # the endpoint is then dropped, which cancels the receives
            checksums = [int(c) for c in reply[wire.HEADER_WORDS :]]
            await _verify_as_they_land(landed, groups, buffers, keys, dests, sizes, checksums, stats)
            stats.transfer_s += time.perf_counter() - t0 - (stats.validate_s - validated_before)

        self._request(receive, stats, keep_on_refusal=False)
        stats.bytes += sum(sizes)
        stats.blocks += n
        return dests

    def _get_pinned(self, keys, outs, stats: TransferStats) -> list[Any]:
        def drain(slots: list[SlotRef], dests: list[Any]) -> None:
            sizes = [s.length for s in slots]
            group_bytes, groups, buffers = _receive_plan(sizes, dests)

            block_keys = [keys[s.index] for s in slots]
            checksums = [s.checksum for s in slots]

            async def receive(ep) -> None:
                t0, validated_before = time.perf_counter(), stats.validate_s
                # Receives are posted before the request goes out, so payloads land in place, never in UCX's unexpected queue.
                landed = [_task(ep.recv(b, tag=wire.DATA_TAG)) for b in buffers]
                reply = _task(self._expect_ok(ep))
                await asyncio.sleep(0)
                await ep.send(wire.header(wire.OP_GET, len(slots), slots[0].handle, group_bytes))

                verified = _task(_verify_as_they_land(landed, groups, buffers, block_keys, dests, sizes, checksums, stats))
                await reply  # a refusal raises here; the endpoint is then dropped, which cancels the receives
                await verified
                stats.transfer_s += time.perf_counter() - t0 - (stats.validate_s - validated_before)

            self._request(receive, stats, keep_on_refusal=False)

        # The server drops the pin as soon as it has sent the slots: one control RPC fewer per get.
        return self.control.get(keys, outs, stats, drain, unpin=False)

    def close(self) -> None:
        self.control.close()
        with self._lock:
            self._drop_locked()


def _receive_plan(sizes: list[int], dests: list[Any]) -> tuple[int, list[range], list[Any]]:
    """How a get's blocks arrive: group size, message groups, and the buffer each message lands in
    (the caller's own for a lone block, staging for a packed run of small ones)."""
    group_bytes = 0 if any(device.is_device(d) for d in dests) else wire.GROUP_BYTES
    groups = wire.message_groups(sizes, group_bytes)
    buffers = [dests[g.start] if len(g) == 1 else np.empty(sum(sizes[g.start : g.stop]), dtype=np.uint8) for g in groups]
    return group_bytes, groups, buffers


async def _verify_as_they_land(landed, groups, buffers, keys, dests, sizes, checksums, stats: TransferStats) -> None:
    """Check each message's blocks as it lands: hashing overlaps the messages still in flight."""
    for task, g, buf in zip(landed, groups, buffers):
        await task
        t1 = time.perf_counter()
        _verify(keys, g, buf, dests, sizes, checksums)
        stats.validate_s += time.perf_counter() - t1


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


def _task(coro: Coroutine) -> asyncio.Task:
    """A task whose failure is always retrieved: after a refusal or timeout nobody awaits the rest."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task
