"""gRPC servicers: translate RPCs to Store calls; the only module that knows gRPC.

Every handler runs inside `_rpc`, which resolves the caller and maps kvstore's
exception types to gRPC status codes, once, here. The local control socket
(local_control.py) calls the same methods, so what is said here holds there too.

A blocked Wait holds a server thread for as long as it waits, so Wait is admitted by
WaitSlots (a few per tenant, at most half the threads in all) and ends as soon as its
caller has gone (context.is_active): abandoned or piled-up Waits cannot starve other
tenants, the health check or an admin.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import grpc

from kvwire.errors import ERROR_TYPE_METADATA, CapacityExhaustedError, InvalidRequestError, KVStoreError
from kvstore.auth import Authenticator
from kvstore.logs import Throttle
from kvstore.store import Caller, KeyState, LeaseInfo, Store
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

GET_MESSAGE_BYTES = 32 << 20
MAX_MESSAGE_BYTES = 256 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def abort_with(context: grpc.ServicerContext, err: KVStoreError) -> None:
    context.set_trailing_metadata(((ERROR_TYPE_METADATA, type(err).__name__),))
    context.abort(grpc.StatusCode[err.status], str(err))


_traceback_due = Throttle(60.0)


def _unexpected(method: str, err: Exception) -> KVStoreError:
    """A bug, not the caller's fault: a generic INTERNAL answer (no detail that could leak state) and
    a traceback at most once a minute per method, so a caller who can trigger it cannot grow the log."""
    if _traceback_due(method):
        log.error("%s failed unexpectedly", method, exc_info=err)
    return KVStoreError(f"internal error in {method}; the server log has details")


def _rpc(method: Callable) -> Callable:
    @functools.wraps(method)
    def handler(self: "KVStoreServicer", request, context: grpc.ServicerContext):
        try:
            caller = self.auth.caller(context.invocation_metadata(), context.peer())
            return method(self, request, context, caller)
        except KVStoreError as err:
            self.observe_error(method.__name__, err)
            abort_with(context, err)
        except ValueError as err:
            abort_with(context, InvalidRequestError(str(err)))
        except Exception as err:
            abort_with(context, _unexpected(method.__name__, err))

    return handler


def _stream_rpc(method: Callable) -> Callable:
    @functools.wraps(method)
    def handler(self: "KVStoreServicer", request, context: grpc.ServicerContext):
        try:
            caller = self.auth.caller(context.invocation_metadata(), context.peer())
            yield from method(self, request, context, caller)
        except KVStoreError as err:
            self.observe_error(method.__name__, err)
            abort_with(context, err)
        except Exception as err:
            abort_with(context, _unexpected(method.__name__, err))

    return handler


def key_status(s: KeyState) -> pb.KeyStatus:
    return pb.KeyStatus(key=s.key, state=s.state, tier=s.tier, size_bytes=s.size, lease_owner=s.lease_owner, lease_expires_unix_ms=s.lease_expires_ms)


def lease_msg(info: LeaseInfo) -> pb.Lease:
    msg = pb.Lease(key=info.key, outcome=info.outcome, lease_id=info.lease_id, owner=info.owner, expires_unix_ms=info.expires_ms)
    if info.slot_length:
        msg.slot.offset, msg.slot.length = info.slot_offset, info.slot_length
    return msg


def stats_message(s: dict) -> pb.StatsResponse:
    tiers = [pb.TierStats(tier=t, capacity_bytes=c, used_bytes=u, blocks=n) for t, c, u, n in s["tiers"]]
    return pb.StatsResponse(tiers=tiers, blocks=s["blocks"], leases_held=s["leases_held"], pins_held=s["pins_held"], counters=s["counters"])


class WaitSlots:
    """How many Waits may block at once: per_tenant for each tenant, total for everyone together."""

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


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, store: Store, auth: Authenticator, data_plane: Callable[[Caller], pb.DataPlaneResponse] | None = None) -> None:
        self.store = store
        self.auth = auth
        self.data_plane = data_plane
        # Half the gRPC threads at most, so Waits can never take every thread from other calls.
        self.wait_slots = WaitSlots(store.cfg.max_waits_per_tenant, max(1, store.cfg.grpc_workers // 2))

    def observe_error(self, method: str, err: KVStoreError) -> None:
        self.store.counters[f"errors_{err.status.lower()}"] += 1
        log.debug("request failed", extra={"method": method, "error": type(err).__name__, "detail": str(err)})

    @_rpc
    def Lookup(self, request, context, caller: Caller):
        if request.prefix_only:
            return pb.LookupResponse(prefix_length=self.store.prefix_length(caller, request.fingerprint_id, list(request.keys)))
        states, prefix = self.store.lookup(caller, request.fingerprint_id, list(request.keys))
        return pb.LookupResponse(statuses=[key_status(s) for s in states], prefix_length=prefix)

    @_rpc
    def AcquireLeases(self, request, context, caller: Caller):
        infos = self.store.acquire(caller, request.fingerprint_id, list(request.keys), request.ttl_ms)
        return pb.AcquireLeasesResponse(leases=[lease_msg(i) for i in infos])

    @_rpc
    def RenewLeases(self, request, context, caller: Caller):
        return pb.RenewLeasesResponse(expires_unix_ms=self.store.renew(caller, list(request.lease_ids), request.ttl_ms))

    @_rpc
    def ReleaseLeases(self, request, context, caller: Caller):
        return pb.ReleaseLeasesResponse(released=self.store.release(caller, list(request.lease_ids)))

    @_rpc
    def Wait(self, request, context, caller: Caller):
        with self.wait_slots.held(caller.tenant):
            states = self.store.wait(caller, request.fingerprint_id, list(request.keys), request.timeout_ms, context.is_active)
        return pb.WaitResponse(statuses=[key_status(s) for s in states])

    @_rpc
    def Reserve(self, request, context, caller: Caller):
        infos = self.store.reserve(caller, request.fingerprint_id, [(b.key, b.size_bytes) for b in request.blocks], request.ttl_ms, request.durable)
        return pb.ReserveResponse(leases=[lease_msg(i) for i in infos])

    def Write(self, request_iterator, context):
        try:
            caller = self.auth.caller(context.invocation_metadata(), context.peer())
            total = 0
            for chunk in request_iterator:
                self.store.write(caller, chunk.lease_id, chunk.offset, chunk.data)
                total += len(chunk.data)
            self.store.counters["grpc_bytes_in"] += total
            return pb.WriteSummary(bytes_written=total)
        except KVStoreError as err:
            self.observe_error("Write", err)
            abort_with(context, err)

    @_rpc
    def Commit(self, request, context, caller: Caller):
        outcomes = self.store.commit(caller, request.fingerprint_id, [(i.lease_id, i.checksum) for i in request.items], request.durable)
        return pb.CommitResponse(outcomes=outcomes)

    @_rpc
    def Put(self, request, context, caller: Caller):
        blocks = [(b.key, b.data, b.checksum) for b in request.blocks]
        outcomes = self.store.put_inline(caller, request.fingerprint_id, blocks, request.durable)
        self.store.counters["grpc_bytes_in"] += sum(len(b.data) for b in request.blocks)
        return pb.PutResponse(outcomes=outcomes)

    @_stream_rpc
    def Get(self, request, context, caller: Caller) -> Iterator[pb.GetResponse]:
        batch, batch_bytes = [], 0
        for key, data, crc in self.store.get(caller, request.fingerprint_id, list(request.keys)):
            batch.append(pb.InlineBlock(key=key, data=data, checksum=crc))
            batch_bytes += len(data)
            self.store.counters["grpc_bytes_out"] += len(data)
            if batch_bytes >= GET_MESSAGE_BYTES:
                yield pb.GetResponse(blocks=batch)
                batch, batch_bytes = [], 0
        if batch:
            yield pb.GetResponse(blocks=batch)

    @_rpc
    def Pin(self, request, context, caller: Caller):
        if request.release_pin_ids:  # first, so the room they hold is free for this pin
            self.store.unpin(caller, list(request.release_pin_ids))
        info = self.store.pin(caller, request.fingerprint_id, list(request.keys), request.ttl_ms, request.prefix_only)
        return pb.PinResponse(
            pin_id=info.pin_id,
            expires_unix_ms=info.expires_ms,
            offsets=info.slots.offsets,
            lengths=info.slots.sizes,
            checksums=info.slots.checksums,
        )

    @_rpc
    def Unpin(self, request, context, caller: Caller):
        return pb.UnpinResponse(released=self.store.unpin(caller, list(request.pin_ids)))

    @_rpc
    def Delete(self, request, context, caller: Caller):
        return pb.DeleteResponse(deleted=self.store.delete(caller, request.fingerprint_id, list(request.keys)))

    @_rpc
    def Stats(self, request, context, caller: Caller):
        # Store-wide numbers would tell one tenant when another caches blocks.
        self.auth.require_admin(caller)
        return stats_message(self.store.stats())

    @_rpc
    def DataPlane(self, request, context, caller: Caller):
        return self.data_plane(caller) if self.data_plane else pb.DataPlaneResponse()
