"""The KVStore service's protobuf messages to and from the request layer's calls, in one table.

Both doors that speak these messages use it: the gRPC servicer (service.py) and the local
control socket (local_control.py), so a call means the same whichever way it came. Each
entry decodes a request, calls StoreAPI with the caller the door authenticated, and encodes
the answer. Enums cross by value (kvwire.types carries the proto numbers). It owns no
status mapping: an error raised here goes to the door's one table.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from kvwire import payload_codec, pin_codec
from kvwire.types import KeyStatus, LeaseInfo
from kvstore.api import DataPlane, IsActive, StoreAPI
from kvstore.store import Caller, PinInfo, StoreStats
from kvwire.v1 import kvstore_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["KVStore"]
# A streamed Get answers in messages of about this much payload. On a 2-core loopback host, 32 MiB of 1 MiB blocks:
# 1 and 2 MiB messages alike (~35-50 ms), 4 MiB slower (~60-115 ms: less overlap of the send and the client's copy),
# one 32 MiB message ~250 ms.
GET_MESSAGE_BYTES = 1 << 20

Handler = Callable[[StoreAPI, Caller, Message, IsActive], Message]
BytesHandler = Callable[[StoreAPI, Caller, Any, IsActive], bytes]


# ---- records -> messages ----------------------------------------------------------------

def key_status(s: KeyStatus) -> pb.KeyStatus:
    return pb.KeyStatus(key=s.key, state=s.state, tier=s.tier, size_bytes=s.size_bytes, lease_owner=s.lease_owner,
                        lease_expires_unix_ms=s.lease_expires_unix_ms)


def lease(info: LeaseInfo) -> pb.Lease:
    msg = pb.Lease(key=info.key, outcome=info.outcome, lease_id=info.lease_id, owner=info.owner, expires_unix_ms=info.expires_unix_ms)
    if info.slot is not None:
        msg.slot.offset, msg.slot.length = info.slot.offset, info.slot.size_bytes
    return msg


def stats_response(s: StoreStats) -> pb.StatsResponse:
    tiers = [pb.TierStats(tier=t.tier, capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes, blocks=t.blocks) for t in s.tiers]
    return pb.StatsResponse(tiers=tiers, blocks=s.blocks, leases_held=s.leases_held, pins_held=s.pins_held, counters=dict(s.counters))


def data_plane_response(d: DataPlane) -> pb.DataPlaneResponse:
    return pb.DataPlaneResponse(shm_name=d.shm_name, shm_size=d.shm_size_bytes, host_id=d.host_id, max_block_bytes=d.max_block_bytes,
                                local_control_socket=d.local_control_socket, ucx_listener=d.ucx_listener,
                                ucx_session_token=d.ucx_session_token, ucx_session_tenant=d.ucx_session_tenant,
                                hbm_device=d.hbm_device, hbm_device_uuid=d.hbm_device_uuid, hbm_handle_file=d.hbm_handle_file,
                                hbm_size=d.hbm_size_bytes, hbm_pool_id=d.hbm_pool_id)


# ---- unary calls ------------------------------------------------------------------------

def _lookup(api: StoreAPI, caller: Caller, r: pb.LookupRequest, is_active: IsActive) -> pb.LookupResponse:
    if r.present_only:
        return pb.LookupResponse(present=api.contains(caller, r.fingerprint_id, list(r.keys)))
    if r.prefix_only:
        return pb.LookupResponse(prefix_length=api.prefix_length(caller, r.fingerprint_id, list(r.keys)))
    statuses, prefix = api.lookup(caller, r.fingerprint_id, list(r.keys))
    return pb.LookupResponse(statuses=[key_status(s) for s in statuses], prefix_length=prefix)


def _acquire(api: StoreAPI, caller: Caller, r: pb.AcquireLeasesRequest, is_active: IsActive) -> pb.AcquireLeasesResponse:
    return pb.AcquireLeasesResponse(leases=[lease(i) for i in api.acquire(caller, r.fingerprint_id, list(r.keys), r.ttl_ms)])


def _renew(api: StoreAPI, caller: Caller, r: pb.RenewLeasesRequest, is_active: IsActive) -> pb.RenewLeasesResponse:
    return pb.RenewLeasesResponse(expires_unix_ms=api.renew(caller, list(r.lease_ids), r.ttl_ms))


def _release(api: StoreAPI, caller: Caller, r: pb.ReleaseLeasesRequest, is_active: IsActive) -> pb.ReleaseLeasesResponse:
    return pb.ReleaseLeasesResponse(released=api.release(caller, list(r.lease_ids)))


def _wait(api: StoreAPI, caller: Caller, r: pb.WaitRequest, is_active: IsActive) -> pb.WaitResponse:
    return pb.WaitResponse(statuses=[key_status(s) for s in api.wait(caller, r.fingerprint_id, list(r.keys), r.timeout_ms, is_active)])


def _reserve(api: StoreAPI, caller: Caller, r: pb.ReserveRequest, is_active: IsActive) -> pb.ReserveResponse:
    infos = api.reserve(caller, r.fingerprint_id, [(b.key, b.size_bytes) for b in r.blocks], r.ttl_ms, r.durable)
    return pb.ReserveResponse(leases=[lease(i) for i in infos])


def _commit(api: StoreAPI, caller: Caller, r: pb.CommitRequest, is_active: IsActive) -> pb.CommitResponse:
    return pb.CommitResponse(outcomes=api.commit(caller, r.fingerprint_id, [(i.lease_id, i.checksum) for i in r.items], r.durable))


def _put(api: StoreAPI, caller: Caller, r: pb.PutRequest | payload_codec.PutRequestFields, is_active: IsActive) -> pb.PutResponse:
    return pb.PutResponse(outcomes=api.put(caller, r.fingerprint_id, [(b.key, b.data, b.checksum) for b in r.blocks], r.durable))


def _pinned(api: StoreAPI, caller: Caller, r: pb.PinRequest | pin_codec.PinRequestFields, packed: bool = False) -> PinInfo:
    keys = r.keys if isinstance(r, pin_codec.PinRequestFields) else list(r.keys)  # a list or PackedKeys already
    return api.pin(caller, r.fingerprint_id, keys, r.ttl_ms, r.prefix_only, list(r.release_pin_ids), packed)


def _pin(api: StoreAPI, caller: Caller, r: pb.PinRequest, is_active: IsActive) -> pb.PinResponse:
    info = _pinned(api, caller, r)
    slots = info.slots
    return pb.PinResponse(pin_id=info.pin_id, expires_unix_ms=info.expires_unix_ms, offsets=slots.offsets, lengths=slots.sizes,
                          checksums=slots.checksums, tiers=slots.tiers, hbm_offsets=slots.hbm_offsets, hbm_pool_id=info.hbm_pool_id)


def _pin_bytes(api: StoreAPI, caller: Caller, r: pin_codec.PinRequestFields, is_active: IsActive) -> bytes:
    """Pin for the local socket: the request's fields and the answer's bytes without message objects (kvwire/pin_codec.py),
    the columns packed from the walk to the encoder (no int object a value)."""
    info = _pinned(api, caller, r, packed=True)
    slots = info.slots
    return pin_codec.encode_response(info.pin_id, info.expires_unix_ms, slots.offsets, slots.sizes, slots.checksums,
                                     slots.tiers, slots.hbm_offsets, info.hbm_pool_id)


def _unpin(api: StoreAPI, caller: Caller, r: pb.UnpinRequest, is_active: IsActive) -> pb.UnpinResponse:
    return pb.UnpinResponse(released=api.unpin(caller, list(r.pin_ids)))


def _delete(api: StoreAPI, caller: Caller, r: pb.DeleteRequest, is_active: IsActive) -> pb.DeleteResponse:
    return pb.DeleteResponse(deleted=api.delete(caller, r.fingerprint_id, list(r.keys)))


def _stats(api: StoreAPI, caller: Caller, r: pb.StatsRequest, is_active: IsActive) -> pb.StatsResponse:
    return stats_response(api.stats(caller))


def _data_plane(api: StoreAPI, caller: Caller, r: pb.DataPlaneRequest, is_active: IsActive) -> pb.DataPlaneResponse:
    return data_plane_response(api.data_plane(caller))


@dataclass(frozen=True)
class Method:
    service: str  # "kvstore.v1.KVStore"
    name: str
    request_class: type[Message]
    call: Handler
    # The local socket's pair, on payload bytes: the request parsed (DecodeError if it does not), and the
    # answer serialized. The message class's own, but for Pin, whose hundreds of keys and slots skip the
    # message objects (kvwire/pin_codec.py), and Put, whose payloads stay views of the request (the gRPC
    # servicer parses Put with it too: kvwire/payload_codec.py).
    parse: Callable[[bytes | memoryview], Any]
    answer: BytesHandler


def _serialized(call: Handler) -> BytesHandler:
    return lambda api, caller, request, is_active: call(api, caller, request, is_active).SerializeToString()


_WIRE: dict[str, tuple[Callable[[bytes | memoryview], Any], BytesHandler]] = {
    "Pin": (pin_codec.decode_request, _pin_bytes),
    "Put": (payload_codec.decode_put_request, _serialized(_put)),
}


_HANDLERS: dict[str, Handler] = {
    "Lookup": _lookup, "AcquireLeases": _acquire, "RenewLeases": _renew, "ReleaseLeases": _release, "Wait": _wait,
    "Reserve": _reserve, "Commit": _commit, "Put": _put, "Pin": _pin, "Unpin": _unpin, "Delete": _delete,
    "Stats": _stats, "DataPlane": _data_plane,
}

# Every unary-unary method of the service, by name; the streaming ones (Get, Write) are below.
UNARY: dict[str, Method] = {
    m.name: Method(SERVICE.full_name, m.name, GetMessageClass(m.input_type), _HANDLERS[m.name],
                   *_WIRE.get(m.name, (GetMessageClass(m.input_type).FromString, _serialized(_HANDLERS[m.name]))))
    for m in SERVICE.methods if not m.client_streaming and not m.server_streaming
}
assert UNARY.keys() == _HANDLERS.keys(), "every unary method of the KVStore service has one handler"


# ---- streaming calls (gRPC only) ----------------------------------------------------------

def get(api: StoreAPI, caller: Caller, r: pb.GetRequest) -> Iterator[bytes]:
    """The blocks in request order as serialized GetResponses of GET_MESSAGE_BYTES payload or so, each built
    straight from the blocks' slots (kvwire/payload_codec.py).

    A host block's payload is a view of its pinned slot. The store unpins when its iterator ends, so it is
    read through islice, which stops at the last block without asking for more: the last message is built
    while the pins still hold, and close() drops them after."""
    keys = list(r.keys)
    blocks = api.get(caller, r.fingerprint_id, keys)
    try:
        yield from payload_codec.encode_get_responses(islice(blocks, len(keys)), GET_MESSAGE_BYTES)
    finally:
        blocks.close()


def write(api: StoreAPI, caller: Caller, chunks: Iterable[bytes]) -> pb.WriteSummary:
    """WriteChunks as received (bytes), each copied from the message straight into its lease's slot."""
    return pb.WriteSummary(bytes_written=api.write(caller, map(payload_codec.decode_write_chunk, chunks)))
