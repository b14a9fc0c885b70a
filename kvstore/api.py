"""StoreAPI, the request layer: every front door's calls as plain batch operations on a Caller.

The gRPC servicer, the local control socket and the UCX data plane are thin adapters over
this class: each authenticates its caller, calls here, and encodes what comes back (kvwire
records and the small frozen dataclasses below) or the domain error raised (kvwire.errors).
What a request may do beyond the store's own rules lives here once, whichever door it came
by: the Wait slots, the data-plane advertisement, unpin-then-pin, pins for the UCX data plane,
payload byte counts per transport, and what a door answers for an error (refusal).

It refuses to know any wire: no grpc, no protobuf, no frames. Request metrics (counts and
latency per method) stay with the doors' observe hook (kvstore/metrics.py).
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator, Protocol, Sequence

from kvwire.errors import CapacityExhaustedError, InvalidRequestError, KVStoreError
from kvwire.hostid import host_id
from kvwire.types import KeyStatus, LeaseInfo, PutOutcome, Slot
from kvstore.auth import Authenticator
from kvstore.counters import Direction, Event, Transport, request_error, transport_bytes
from kvstore.logs import Throttle
from kvstore.store import BlockStream, Caller, PinInfo, PinnedSlots, Store, StoreStats

log = logging.getLogger(__name__)

IsActive = Callable[[], bool]


def _not_a_peer(blocks: int, nbytes: int) -> None:
    """What a send to a client counts as peer traffic: nothing."""


TRACEBACK_EVERY_S = 60.0  # an unexpected failure's traceback, at most this often per method

# Payload bytes are counted per transport. Inline payloads travel inside protobuf messages,
# over gRPC or the local socket alike: Transport.GRPC.
INLINE = Transport.GRPC


class WaitSlots:
    """How many Waits may block at once: per_tenant for each tenant, total for everyone together.

    A blocked Wait holds a server thread for as long as it waits, so abandoned or piled-up Waits
    must not starve other tenants, the health check or an admin."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant, self.total = per_tenant, total
        self._lock = threading.Lock()
        self._by_tenant: Counter[str] = Counter()

    @contextmanager
    def held(self, tenant: str) -> Iterator[None]:
        with self._lock:
            # Neither message counts anyone else's Waits: that would tell one tenant about another's activity.
            if self._by_tenant[tenant] >= self.per_tenant:
                raise CapacityExhaustedError(f"tenant {tenant!r} already has {self.per_tenant} Waits in progress, its limit; "
                                             "retry when one has returned, or poll with Lookup")
            if sum(self._by_tenant.values()) >= self.total:
                raise CapacityExhaustedError("the server is blocking as many Waits as it allows; retry shortly, or poll with Lookup")
            self._by_tenant[tenant] += 1
        try:
            yield
        finally:
            with self._lock:
                self._by_tenant[tenant] -= 1
                if not self._by_tenant[tenant]:
                    del self._by_tenant[tenant]


@dataclass(frozen=True)
class DataPlane:
    """Where a client can map the host pool and reach the server's other doors; "" or empty where one is off."""

    shm_name: str
    shm_size_bytes: int
    host_id: str
    max_block_bytes: int
    local_control_socket: str = ""
    ucx_listener: str = ""  # host:port
    ucx_session_token: bytes = b""  # binds a UCX session to the caller's tenant and client id
    ucx_session_tenant: str = ""
    # The HBM tier, for a same-host GPU client to map (kvstore/hbm_placement.py); hbm_size_bytes 0 when there is none.
    hbm_device: int = 0  # the server's CUDA ordinal of the pool's GPU (the client finds its own by uuid)
    hbm_device_uuid: str = ""
    hbm_handle_file: str = ""  # the file holding the pool's CUDA IPC handle (owner-only); "" when it is not shared
    hbm_size_bytes: int = 0
    hbm_pool_id: int = 0  # Pin answers name it, so offsets are never applied to another allocation's mapping


class ClusterGate(Protocol):
    """What cluster mode adds to requests (kvstore/cluster/node.py): reads refused while fenced in strict mode,
    and a commit answered once its directory homes know the blocks (bounded by cluster_announce_wait_ms)."""

    def before_read(self, caller: Caller) -> None:
        """Raises FencedError while this node may not serve this caller's reads."""

    def after_commit(self) -> None:
        """Returns once this node's commits so far are announced to their homes, or the wait bound passed."""

    def peer_send(self, caller: Caller) -> ContextManager[Callable[[int, int], None]]:
        """Around a data plane's send of blocks: for a peer's session, one slot under peer_max_inflight (PeerBusyError
        past it), yielding what to call with the (blocks, bytes) sent; for any other caller, nothing to count."""


class UcxSessions(Protocol):
    """What the request layer needs of a running UCX data plane to advertise it."""

    port: int

    def session_token(self, caller: Caller) -> bytes: ...


class StoreAPI:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.cfg = store.cfg
        # Half the gRPC threads at most, so Waits can never take every thread from other calls.
        self.wait_slots = WaitSlots(self.cfg.max_waits_per_tenant, max(1, self.cfg.grpc_workers // 2))
        # Set by the server once each door is up, before gRPC answers DataPlane.
        self.local_control_path = ""
        self.ucx: UcxSessions | None = None
        self.cluster: ClusterGate | None = None  # set by cluster mode before the doors open
        self._traceback_due = Throttle(TRACEBACK_EVERY_S)

    # ---- lookup and leases ----------------------------------------------------------

    def _before_read(self, caller: Caller) -> None:
        if self.cluster is not None:
            self.cluster.before_read(caller)

    def _after_commit(self, outcomes: list[PutOutcome]) -> list[PutOutcome]:
        if self.cluster is not None and PutOutcome.STORED in outcomes:
            self.cluster.after_commit()
        return outcomes

    def lookup(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> tuple[list[KeyStatus], int]:
        """Each key's status and how many leading keys are present."""
        self._before_read(caller)
        return self.store.lookup(caller, fingerprint_id, keys)

    def prefix_length(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> int:
        self._before_read(caller)
        return self.store.prefix_length(caller, fingerprint_id, keys)

    def contains(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> bytes:
        """One byte a key: 1 where it is present (Store.contains)."""
        self._before_read(caller)
        return self.store.contains(caller, fingerprint_id, keys)

    def acquire(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0) -> list[LeaseInfo]:
        return self.store.acquire(caller, fingerprint_id, keys, ttl_ms)

    def renew(self, caller: Caller, lease_ids: Sequence[int], ttl_ms: int = 0) -> list[int]:
        """The leases' new expiry times (Unix ms)."""
        return self.store.renew(caller, lease_ids, ttl_ms)

    def release(self, caller: Caller, lease_ids: Sequence[int]) -> int:
        return self.store.release(caller, lease_ids)

    def wait(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], timeout_ms: int,
             is_active: IsActive | None = None) -> list[KeyStatus]:
        """Block until no key is pending, the timeout, or is_active() says the caller has gone; admitted by wait_slots."""
        with self.wait_slots.held(caller.tenant):
            return self.store.wait(caller, fingerprint_id, keys, timeout_ms, is_active)

    # ---- writes -----------------------------------------------------------------------

    def reserve(self, caller: Caller, fingerprint_id: bytes, specs: Sequence[tuple[bytes, int]], ttl_ms: int = 0,
                durable: bool = False) -> list[LeaseInfo]:
        """specs: (key, size_bytes). A granted lease comes with its slot in the host pool."""
        return self.store.reserve(caller, fingerprint_id, specs, ttl_ms, durable)

    def write(self, caller: Caller, chunks: Iterable[tuple[int, int, bytes | memoryview]]) -> int:
        """chunks: (lease_id, offset within the block, data), copied into the leases' slots; the bytes written."""
        written = 0
        for lease_id, offset, data in chunks:
            self.store.write(caller, lease_id, offset, data)
            written += len(data)
        self.count_bytes(INLINE, Direction.IN, written)
        return written

    def commit(self, caller: Caller, fingerprint_id: bytes, items: Sequence[tuple[int, int]], durable: bool = False) -> list[PutOutcome]:
        """items: (lease_id, checksum). In cluster mode answered once the new blocks are announced (ClusterGate)."""
        return self._after_commit(self.store.commit(caller, fingerprint_id, items, durable))

    def put(self, caller: Caller, fingerprint_id: bytes, blocks: Sequence[tuple[bytes, bytes, int]], durable: bool = False) -> list[PutOutcome]:
        """blocks: (key, data, checksum), stored whole in one call."""
        outcomes = self.store.put_inline(caller, fingerprint_id, blocks, durable)
        self.count_bytes(INLINE, Direction.IN, sum(len(data) for _, data, _ in blocks))
        return self._after_commit(outcomes)

    # ---- reads ------------------------------------------------------------------------

    def get(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> BlockStream:
        """(key, payload, checksum) in request order; BlockNotFoundError before the first if any is missing.
        A payload may be a view of its pinned slot, valid until the generator ends or is closed (Store.get)."""
        self._before_read(caller)
        return self._counted(self.store.get(caller, fingerprint_id, keys))

    def _counted(self, blocks: BlockStream) -> BlockStream:
        counters, sent = self.store.counters, transport_bytes(INLINE, Direction.OUT)
        try:
            for block in blocks:
                counters[sent] += len(block[1])  # per block: a cancelled stream counts what it sent
                yield block
        finally:
            blocks.close()  # the store's pins go when the caller closes this, not when it is garbage

    def pin(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0, prefix: bool = False,
            release_pin_ids: Sequence[int] = (), packed: bool = False) -> PinInfo:
        """Pin the blocks in the host pool for the caller to copy out; with prefix, the leading present run.
        Blocks with an HBM copy are named there too (PinInfo.slots.tiers, hbm_offsets), for a device-to-device copy.

        release_pin_ids are dropped first, so the room they hold is free for this pin."""
        self._before_read(caller)
        return self.store.pin(caller, fingerprint_id, keys, ttl_ms, prefix, release_pin_ids, packed)

    def unpin(self, caller: Caller, pin_ids: Sequence[int]) -> int:
        return self.store.unpin(caller, pin_ids)

    def settle_reads(self) -> None:
        """After an answer is sent: the bookkeeping its reads left for then (Store.settle_reads)."""
        self.store.settle_reads()

    def delete(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> int:
        return self.store.delete(caller, fingerprint_id, keys)

    # ---- the server -------------------------------------------------------------------

    def stats(self, caller: Caller) -> StoreStats:
        """Store-wide numbers, for admins only: they would tell one tenant when another caches blocks."""
        Authenticator.require_admin(caller)
        return self.store.stats()

    def data_plane(self, caller: Caller) -> DataPlane:
        ucx = self.ucx
        hbm = self.store.hbm.export() if self.store.hbm is not None else None
        return DataPlane(
            shm_name=self.store.host.shm_name if self.cfg.shm else "",
            shm_size_bytes=self.store.host.capacity_bytes,
            host_id=self.cfg.host_id or host_id(),
            max_block_bytes=self.cfg.max_block_bytes,
            local_control_socket=self.local_control_path,
            ucx_listener=f"{self.cfg.listen.rsplit(':', 1)[0]}:{ucx.port}" if ucx is not None else "",
            ucx_session_token=ucx.session_token(caller) if ucx is not None else b"",
            ucx_session_tenant=caller.tenant if ucx is not None else "",
            **({} if hbm is None else dict(hbm_device=max(hbm.device_index, 0), hbm_device_uuid=hbm.device_uuid,
                                          hbm_handle_file=hbm.handle_file if self.cfg.shm else "",
                                          hbm_size_bytes=hbm.size_bytes, hbm_pool_id=hbm.pool_id)),
        )

    # ---- for a data plane that moves the bytes itself (UCX) ----------------------------

    @property
    def pool_view(self):
        """The host pool's bytes, which a data plane sends from and receives into (only at slots this API named)."""
        return self.store.host.view

    def hbm_sources(self, slots: PinnedSlots, device_ok: bool) -> list | None:
        """Where pinned blocks have an HBM copy, the copy's bytes in place for a data plane to send from (None for the
        others), or None when there is nothing to send from HBM (device_ok: the sender can read GPU memory)."""
        hbm = self.store.hbm
        return None if hbm is None else hbm.send_sources(slots.tiers, slots.hbm_offsets, slots.sizes, device_ok)

    def hbm_sendable(self, device_ok: bool) -> bool:
        """Whether a data plane that can (device_ok) or cannot read GPU memory may send from the HBM tier."""
        return self.store.hbm is not None and self.store.hbm.sendable(device_ok)

    def needs_staging(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> bool:
        """Whether pinning these keys would read LMDB (some are on the SSD tier only): an event loop pins elsewhere then."""
        return self.store.needs_staging(caller, fingerprint_id, keys)

    def send_slot(self, caller: Caller) -> ContextManager[Callable[[int, int], None]]:
        """Held around one send of blocks (ClusterGate.peer_send): a peer's transfers are capped and counted."""
        if self.cluster is None:
            return nullcontext(_not_a_peer)
        return self.cluster.peer_send(caller)

    def pin_for_send(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> PinInfo:
        """A pin that lives while one transfer sends the blocks; the data plane unpins once the sends are done."""
        self._before_read(caller)
        return self.store.pin(caller, fingerprint_id, keys)

    def pinned_slots(self, caller: Caller, pin_id: int) -> PinnedSlots:
        """The slots of one of the caller's live pins, to send."""
        return self.store.pinned_slots(caller, pin_id)

    def claim_write_slots(self, caller: Caller, lease_ids: Sequence[int]) -> list[Slot]:
        """The reserved slots of the caller's leases, to receive into; held so expiry cannot free one mid-receive."""
        return self.store.claim_write_slots(caller, lease_ids)

    # ---- accounting -------------------------------------------------------------------

    def count_bytes(self, transport: Transport, direction: Direction, nbytes: int) -> None:
        """Payload bytes a door moved itself (the shm pool's clients move theirs without the server)."""
        self.store.counters[transport_bytes(transport, direction)] += nbytes

    def count(self, event: Event, n: int = 1) -> None:
        self.store.counters[event] += n

    def refusal(self, method: str, err: Exception) -> KVStoreError:
        """The domain error a door answers for err, raised while serving method; each door encodes it once.

        A kvstore error is the answer itself (and is counted by status); ValueError is the caller's
        mistake (INVALID_ARGUMENT); anything else is a bug, answered with a generic INTERNAL error (no
        detail that could leak state) and its traceback logged at most once a minute per method, so a
        caller who can trigger it cannot grow the log."""
        if isinstance(err, ValueError) and not isinstance(err, KVStoreError):
            err = InvalidRequestError(str(err))
        if isinstance(err, KVStoreError):
            self.store.counters[request_error(err.status)] += 1
            log.debug("request refused", extra={"method": method, "error": type(err).__name__, "detail": str(err)})
            return err
        if self._traceback_due(method):
            log.error("%s failed unexpectedly (further failures of it are not logged for %g s)", method, TRACEBACK_EVERY_S, exc_info=err)
        return KVStoreError(f"internal error in {method}; the server log has details")
