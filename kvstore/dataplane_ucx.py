"""The server's UCX data plane: a UCXX listener that moves block payloads straight from/into the host pool.

It owns the UCX event loop (a background thread running asyncio, with ucxx's
progress thread), the per-connection request loop and the UCX door's one error
table (_reply_error: the domain error's type name and detail, parsed back by the
client's ucx.py); it never decides policy. Which slots may be read or written comes
from the request layer (StoreAPI: pin_for_send, pinned_slots, claim_write_slots),
the same checks the gRPC control plane makes, for the caller its session names.

How bytes move: tagged transfers, one message per large block or per run of small
ones (ucx_wire.message_groups). ucxx's Python API has no memory registration /
rkey export for one-sided RMA, so instead of the client doing ucp_get into a
registered pool, the server posts tag sends from (and tag receives into)
memoryviews of the pool itself: no staging copy for large blocks, and on
rendezvous-capable transports UCX moves the bytes zero-copy. One asyncio loop
serves every connection; nothing on it waits on the network, and UCX completions
resolve futures instead of being polled (kvclient/ucxenv.start_context), so busy
connections cannot starve the progress thread or each other. A client
proves who it is with a session token from the authenticated DataPlane RPC,
HMAC(server secret, tenant, client_id), and names that tenant and client id in its
hello: the UCX port grants nothing gRPC would not, and no bearer token ever crosses
it (UCX is not encrypted). The tenant is the one the DataPlane caller's bearer token
resolved to, so a session that claims another tenant's client id reaches only its
own tenant's pins and leases (the store keys both by tenant and client id), and an
error sent back names only ids the request itself named. Knowing the caller's
tenant, the data plane can pin by key inside a get (OP_GET_KEYS), the pin living
only while the request is served and dropped once the sends complete or fail.

Blocks with an HBM copy: a client landing a get in GPU memory sets FLAG_FROM_HBM (its
blocks then travel one message each), and each such block is sent from its HBM copy in
place, GPU to GPU through UCX's CUDA transports (cuda_ipc on one host, RDMA with
GPUDirect across hosts), where this process's UCX context can read GPU memory (UCX_TLS
names cuda_copy / cuda_ipc, or all); otherwise from its host copy, which the inclusive
tier always keeps. The hello says whether the server honours the flag (HELLO_HBM_SENDS).
Peers fetch into their host pool, so their gets are served from host copies.

Where it listens: ucxx's Python API (0.52) can only listen on every interface (its
create_listener takes a port, no address; the C++ ListenerBuilder::host is not bound,
and no UCX setting narrows a sockaddr listener). So with a loopback `listen`, which
says "this host only", the data plane does not start unless ucx_all_interfaces allows
it: same-host clients use shm anyway. With another address it starts and says in the
log that it listens wider than `listen`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import struct
import threading
from typing import Callable

import numpy as np

from kvwire.errors import InvalidRequestError, UnauthenticatedError
from kvwire import ucx_wire as wire
from kvwire.blockcopy import copy_blocks, packed_offsets
from kvwire.ucxenv import import_ucxx, start_context
from kvstore.api import StoreAPI
from kvstore.counters import Direction, Event, Transport
from kvstore.config import ServerConfig
from kvstore.store import Caller, PinInfo, PinnedSlots

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
MAX_BLOCKS_PER_REQUEST = 1 << 20


def cuda_capable() -> bool:
    """Whether this process's UCX context moves GPU memory: UCX_TLS names a CUDA transport (or all) in a CUDA build.
    A context without one would read a GPU address as host memory, so nothing is sent from GPU memory then."""
    from ucxx import core

    return bool(getattr(getattr(core._ctx, "context", None), "cuda_support", False))


def listen_host(cfg: ServerConfig) -> str:
    return cfg.listen.rsplit(":", 1)[0].strip("[]")


def is_loopback(host: str) -> bool:
    """Whether every address host names is a loopback one ("localhost" may be 127.0.1.1 too)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class UcxDataPlane:
    def __init__(self, api: StoreAPI, port: int = 0) -> None:
        self.api = api
        self.requested_port = port
        self.port = 0
        self._secret = secrets.token_bytes(32)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._device_ok = False  # this process's UCX context moves GPU memory (UCX_TLS names a CUDA transport)
        self._thread = threading.Thread(target=self._run, name="kvstore-ucx", daemon=True)

    @classmethod
    def start_if_available(cls, api: StoreAPI, port: int = 0) -> "UcxDataPlane | None":
        """Start the listener, or log why not and return None: the server must run without UCX."""
        host = listen_host(api.cfg)
        if is_loopback(host) and not api.cfg.ucx_all_interfaces:
            log.info("UCX data plane off: listen is %s, this host only, but ucxx can listen only on every interface; "
                     "set ucx_all_interfaces = true to accept that", host)
            return None
        if import_ucxx() is None:
            from kvwire.ucxenv import unavailable_reason

            log.info("UCX data plane off: %s", unavailable_reason())
            return None
        plane = cls(api, port)
        try:
            plane.start()
        except Exception as err:
            log.warning("UCX data plane failed to start: %s", err)
            return None
        if host not in WILDCARD_HOSTS:
            log.warning("UCX data plane listens on every interface (port %d), wider than listen %s: ucxx cannot listen on one address",
                        plane.port, host)
        return plane

    def session_token(self, caller: Caller) -> bytes:
        """What the DataPlane RPC hands an authenticated caller: it binds both its tenant and its client id."""
        return self._token(caller.tenant, caller.client_id)

    def _token(self, tenant: str, client_id: str) -> bytes:
        # Length-prefixed, so no other split of the same bytes into (tenant, client_id) has this token.
        bound = tenant.encode()
        return hmac.new(self._secret, struct.pack("<I", len(bound)) + bound + client_id.encode(), hashlib.sha256).digest()

    # ---- lifecycle ----------------------------------------------------------------

    def start(self, timeout_s: float = 30) -> "UcxDataPlane":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("UCX listener did not start")
        if self._error is not None:
            raise self._error
        log.info("UCX data plane listening on port %d", self.port)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # reported to start(); after that, logged
            self._error = err
            self._ready.set()
            log.exception("UCX data plane stopped")

    async def _main(self) -> None:
        ucxx = import_ucxx()
        start_context(ucxx)
        self._device_ok = cuda_capable()
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        listener = ucxx.create_listener(self._serve, port=self.requested_port)
        self.port = listener.port
        self._ready.set()
        await self._stopping.wait()
        listener.close()
        ucxx.stop_notifier_thread()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=5)

    # ---- per-connection request loop ----------------------------------------------

    async def _serve(self, ep) -> None:
        try:
            caller = await self._hello(ep)
            request = np.empty(wire.REQUEST_BYTES // 8, dtype=np.uint64)  # a shorter message lands in its head
            while True:
                await ep.recv(request)
                word, count, arg, arg2 = (int(w) for w in request[: wire.HEADER_WORDS])
                op, from_hbm = word & wire.OP_MASK, bool(word & wire.FLAG_FROM_HBM)
                if word & ~(wire.OP_MASK | wire.FLAG_FROM_HBM):
                    raise ConnectionError(f"UCX request with unknown flags {word & ~wire.OP_MASK:#x}")
                if not 0 < count <= MAX_BLOCKS_PER_REQUEST:
                    raise ConnectionError(f"UCX request names {count} blocks")
                if op == wire.OP_GET_KEYS:
                    await self._get_keys(ep, caller, request, count, group_bytes=min(arg, wire.MAX_GROUP_BYTES), body_bytes=arg2,
                                         from_hbm=from_hbm)
                elif op == wire.OP_GET:
                    await self._get(ep, caller, count, pin_id=arg, group_bytes=min(arg2, wire.MAX_GROUP_BYTES), from_hbm=from_hbm)
                elif op == wire.OP_PUT:
                    await self._put(ep, caller, count, group_bytes=min(arg, wire.MAX_GROUP_BYTES))
                else:
                    raise ConnectionError(f"unknown UCX op {op}")
        except Exception as err:  # peer gone or protocol broken: drop the endpoint, keep serving others
            log.debug("UCX connection ended: %s: %s", type(err).__name__, err)
        finally:
            ep.abort()

    async def _hello(self, ep) -> Caller:
        hdr = wire.empty_header()
        await ep.recv(hdr)
        id_len, token_len, tenant_len = int(hdr[1]), int(hdr[2]), int(hdr[3])
        if int(hdr[0]) != wire.OP_HELLO or not 0 < id_len <= 1024 or token_len != 32 or tenant_len > 1024:
            raise ConnectionError("bad UCX hello")
        body = np.empty(id_len + token_len + tenant_len, dtype=np.uint8)
        await ep.recv(body)
        raw = body.tobytes()
        client_id, token = raw[:id_len].decode(), raw[id_len : id_len + token_len]
        tenant = raw[id_len + token_len :].decode()
        if not hmac.compare_digest(token, self._token(tenant, client_id)):
            await self._refuse(ep, "UcxHello", UnauthenticatedError("UCX session token does not match; call DataPlane again"))
            raise ConnectionError("UCX hello with a bad session token")
        offers = wire.HELLO_KEYED_GETS | (wire.HELLO_HBM_SENDS if self.api.hbm_sendable(self._device_ok) else 0)
        await ep.send(wire.header(wire.STATUS_OK, offers))
        return Caller(tenant=tenant, client_id=client_id)

    async def _refuse(self, ep, method: str, err: Exception, reply: np.ndarray | None = None) -> None:
        """The UCX door's one error table: a reply with STATUS_ERROR, then the domain error as "TypeName: detail"
        (kvwire.ucx_wire.error_detail), which the client raises as that type, carrying its status.

        reply: the reply buffer shape the client pre-posted for this request (a keyed get's u64[4 + n],
        the detail's length in word 3); by default a plain header, the length in word 1."""
        detail = wire.error_detail(self.api.refusal(method, err))
        if reply is None:
            reply = wire.header(wire.STATUS_ERROR, len(detail))
        else:
            reply[:4] = (wire.STATUS_ERROR, 0, 0, len(detail))
        await ep.send(reply)
        await ep.send(np.frombuffer(detail, dtype=np.uint8))

    async def _get(self, ep, caller: Caller, count: int, pin_id: int, group_bytes: int, from_hbm: bool) -> None:
        """Send the pinned slots, then the reply, then drop the pin: once a send completes, UCX no longer needs the source.

        On a refusal the client's pre-posted receives stay unmatched; it drops the endpoint.
        """
        try:
            try:
                slots = self.api.pinned_slots(caller, pin_id)
                if len(slots) != count:
                    raise InvalidRequestError(f"pin {pin_id} holds {len(slots)} blocks, request names {count}")
            except Exception as err:
                await self._refuse(ep, "UcxGet", err)
                return
            sent = sum(slots.sizes)
            await asyncio.gather(*await self._post_slots(ep, slots, group_bytes, from_hbm),
                                 ep.send(wire.header(wire.STATUS_OK, count, sent)))
            self.api.count_bytes(Transport.UCX, Direction.OUT, sent)
        finally:
            self.api.unpin(caller, [pin_id])

    async def _get_keys(self, ep, caller: Caller, request: np.ndarray, count: int, group_bytes: int, body_bytes: int,
                        from_hbm: bool) -> None:
        """Pin the named keys for this request only, reply with their checksums, send the slots, drop the pin.

        The pin is dropped in `finally`: after the sends completed, or when one failed
        (the endpoint is then aborted, so nothing more is read from the slots).
        On a refusal the client's pre-posted payload receives stay unmatched; it drops the endpoint.
        """
        if body_bytes > count * 1024 + 1024:
            raise ConnectionError("bad UCX keyed get")
        if wire.keyed_get_inline(count, body_bytes):
            meta = request[wire.HEADER_WORDS : wire.HEADER_WORDS + 2 * count]
            start = 8 * (wire.HEADER_WORDS + 2 * count)
            raw = request.view(np.uint8)[start : start + body_bytes].tobytes()
        else:
            meta, body = np.empty(2 * count, dtype=np.uint64), np.empty(body_bytes, dtype=np.uint8)
            await ep.recv(meta)
            await ep.recv(body)
            raw = body.tobytes()
        expected, key_lens = [int(s) for s in meta[:count]], [int(n) for n in meta[count:]]
        fingerprint_len = body_bytes - sum(key_lens)
        if not 0 < fingerprint_len <= 1024 or max(key_lens) > 1024:
            raise ConnectionError("bad UCX keyed get")
        fingerprint_id, keys, pos = raw[:fingerprint_len], [], fingerprint_len
        for n in key_lens:
            keys.append(raw[pos : pos + n])
            pos += n
        reply = np.zeros(wire.HEADER_WORDS + count, dtype=np.uint64)
        with contextlib.ExitStack() as held:
            try:  # a peer's get holds one of the node's peer transfer slots (busy past the cap) while it sends
                served = held.enter_context(self.api.send_slot(caller))
                info = await self._pin(caller, fingerprint_id, keys)
            except Exception as err:
                await self._refuse(ep, "UcxGetKeys", err, reply)
                return
            await self._send_keyed(ep, caller, info, keys, expected, count, group_bytes, reply, served, from_hbm)

    async def _send_keyed(self, ep, caller: Caller, info: PinInfo, keys: list[bytes], expected: list[int], count: int,
                          group_bytes: int, reply: np.ndarray, served: Callable[[int, int], None], from_hbm: bool) -> None:
        """The rest of a keyed get, once pinned: the reply with checksums, the slots, then the pin dropped."""
        try:
            sizes = info.slots.sizes
            if sizes != expected:
                bad = next(i for i, (a, b) in enumerate(zip(sizes, expected)) if a != b)
                err = InvalidRequestError(f"output buffer for block {keys[bad].hex()} holds {expected[bad]} bytes; the block has {sizes[bad]}")
                await self._refuse(ep, "UcxGetKeys", err, reply)
                return
            sent = sum(sizes)
            reply[:3] = (wire.STATUS_OK, count, sent)
            reply[wire.HEADER_WORDS :] = info.slots.checksums
            sends = [asyncio.ensure_future(ep.send(reply))]
            await asyncio.gather(*sends, *await self._post_slots(ep, info.slots, group_bytes, from_hbm))
            self.api.count_bytes(Transport.UCX, Direction.OUT, sent)
            served(count, sent)
        finally:
            self.api.unpin(caller, [info.pin_id])

    async def _post_slots(self, ep, slots: PinnedSlots, group_bytes: int, from_hbm: bool) -> list[asyncio.Future]:
        """Post a get's payload sends: a block travelling alone goes from its HBM copy where the client asked for that
        and it has one, everything else from the host pool."""
        hbm = self.api.hbm_sources(slots, self._device_ok) if from_hbm else None
        sends, from_copies = await _post_slots(ep, self.api.pool_view, slots.offsets, slots.sizes, group_bytes, hbm)
        if from_copies:
            self.api.count(Event.UCX_HBM_SENDS, from_copies)
        return sends

    async def _pin(self, caller: Caller, fingerprint_id: bytes, keys: list[bytes]) -> PinInfo:
        """Pin on the loop when every block is in the host pool; staging from LMDB (read and checked)
        runs on a worker thread instead, so one client's cold blocks do not stall every other client.
        (A block demoted between the check and the pin is read on the loop: rare, and correct.)"""
        if not self.api.needs_staging(caller, fingerprint_id, keys):
            return self.api.pin_for_send(caller, fingerprint_id, keys)
        self.api.count(Event.UCX_PINS_STAGED_OFF_LOOP)
        return await asyncio.get_running_loop().run_in_executor(None, self.api.pin_for_send, caller, fingerprint_id, keys)

    async def _put(self, ep, caller: Caller, count: int, group_bytes: int) -> None:
        """Receive the payloads into the reserved slots; a refused request is drained first, so the endpoint stays in step."""
        meta = np.empty(2 * count, dtype=np.uint64)
        await ep.recv(meta)
        lease_ids, sizes = [int(i) for i in meta[:count]], [int(s) for s in meta[count:]]
        if max(sizes) > self.api.cfg.max_block_bytes:
            raise ConnectionError(f"UCX put names a {max(sizes)}-byte block")
        groups = wire.message_groups(sizes, group_bytes)
        try:
            slots = self.api.claim_write_slots(caller, lease_ids)
            if [slot.size_bytes for slot in slots] != sizes:
                raise InvalidRequestError("UCX put sizes do not match the reserved slots")
        except Exception as err:
            await _drain(ep, sizes, groups)
            await self._refuse(ep, "UcxPut", err)
            return
        view = self.api.pool_view
        offsets = [slot.offset for slot in slots]
        staged, recvs = [], []
        for g in groups:
            group_offsets, group_sizes = offsets[g.start : g.stop], sizes[g.start : g.stop]
            if wire.contiguous(group_offsets, group_sizes):
                recvs.append(ep.recv(view[group_offsets[0] : group_offsets[-1] + group_sizes[-1]], tag=wire.DATA_TAG))
            else:
                buf = np.empty(sum(group_sizes), dtype=np.uint8)
                staged.append((buf, group_offsets, group_sizes))
                recvs.append(ep.recv(buf, tag=wire.DATA_TAG))
        await asyncio.gather(*recvs)
        for buf, group_offsets, group_sizes in staged:
            _scatter(buf, view, group_offsets, group_sizes)
        received = sum(sizes)
        self.api.count_bytes(Transport.UCX, Direction.IN, received)
        await ep.send(wire.header(wire.STATUS_OK, count, received))


async def _post_slots(ep, view: np.ndarray, offsets: list[int], sizes: list[int], group_bytes: int,
                      hbm: list | None = None) -> tuple[list[asyncio.Future], int]:
    """Post every payload message of a get at once; the caller awaits them. hbm: per block, its HBM copy to send
    from instead when it travels alone (None: the host pool). Also returns how many went from HBM copies."""
    sends, from_copies = [], 0
    for g in wire.message_groups(sizes, group_bytes):
        group_offsets, group_sizes = offsets[g.start : g.stop], sizes[g.start : g.stop]
        staged = not wire.contiguous(group_offsets, group_sizes)
        source = hbm[g.start] if hbm is not None and len(g) == 1 else None
        if source is None:
            source = _gather(view, group_offsets, group_sizes)
        else:
            from_copies += 1
        send = asyncio.ensure_future(ep.send(source, tag=wire.DATA_TAG))
        send.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even when a sibling failed first
        sends.append(send)
        if staged:  # let the posted sends go out while the next group is copied
            await asyncio.sleep(0)
    return sends, from_copies


def _gather(view: np.ndarray, offsets: list[int], sizes: list[int]) -> np.ndarray:
    """One message's bytes: a view of the pool when the slots are adjacent, else one staging copy (one native call)."""
    if wire.contiguous(offsets, sizes):
        return view[offsets[0] : offsets[-1] + sizes[-1]]
    staged = np.empty(sum(sizes), dtype=np.uint8)
    copy_blocks(view, offsets, staged, packed_offsets(sizes), sizes)
    return staged


def _scatter(buf: np.ndarray, view: np.ndarray, offsets: list[int], sizes: list[int]) -> None:
    copy_blocks(buf, packed_offsets(sizes), view, offsets, sizes)


async def _drain(ep, sizes: list[int], groups: list[range]) -> None:
    """Receive and discard a refused put's payloads, one message at a time (refusals are rare)."""
    scratch = np.empty(max(sum(sizes[g.start : g.stop]) for g in groups), dtype=np.uint8)
    for g in groups:
        await ep.recv(scratch[: sum(sizes[g.start : g.stop])], tag=wire.DATA_TAG)
