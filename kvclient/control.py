"""The typed control channel: every control call KVClient makes, as a batch method that takes plain
values and returns kvwire records, raising kvwire's domain errors.

Two channels implement it: GrpcControl here, and LocalControl (local_control.py) over the server's
Unix socket when the server is on this host. Both speak the same protobuf messages, so the typed
methods are written once (ProtoControl) over one unary call each channel supplies; a failed call's
status becomes a domain error once, in that call. This module and local_control.py are the client's
only readers of the generated code, with transports/grpc_inline.py, whose payload messages are its own.
It refuses to own what the answers mean: leases, pins and transports are KVClient's.

Answers that carry hundreds of blocks (Reserve, Pin) come back as plain rows or columns:
a record per block cost more to build than the call itself.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import grpc

from kvclient.errors import TransferError, from_rpc_error
from kvwire.defaults import AUTH_METADATA, CLIENT_ID_METADATA, MAX_MESSAGE_BYTES, TENANT_METADATA
from kvwire.keys import BlockKey
from kvwire.types import BlockState, KeyStatus, LeaseInfo, LeaseOutcome, PutOutcome, Tier
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc

Metadata = tuple[tuple[str, str], ...]
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
_SERVICE = pb.DESCRIPTOR.services_by_name["KVStore"].full_name


@dataclass(frozen=True)
class ClientIdentity:
    """Who calls: the client id owns leases and pins within the tenant; the token proves the tenant."""

    client_id: str
    tenant: str | None = None
    token: str | None = None

    @classmethod
    def new(cls, tenant: str | None = None, token: str | None = None) -> "ClientIdentity":
        return cls(f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}", tenant, token)

    def metadata(self) -> Metadata:
        md = [(CLIENT_ID_METADATA, self.client_id)]
        if self.tenant:
            md.append((TENANT_METADATA, self.tenant))
        if self.token:
            md.append((AUTH_METADATA, f"Bearer {self.token}"))
        return tuple(md)


# ---- answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPlaneInfo:
    """Where a same-host client can map the host pool, and how to reach the server's data planes."""

    host_id: str
    shm_name: str = ""  # "" when the pool is not shared
    shm_size: int = 0
    ucx_listener: str = ""  # host:port, "" when UCX is off
    ucx_session_token: bytes = b""
    ucx_session_tenant: str = ""
    max_block_bytes: int = 0
    local_control_socket: str = ""  # "" when the server serves no local control socket
    hbm_device_uuid: str = ""  # the server's HBM tier (hbm_size 0: none), mapped by kvclient/hbm.py
    hbm_handle_file: str = ""  # readable by the server's OS user only: where the pool's CUDA IPC handle is
    hbm_size: int = 0
    hbm_pool_id: int = 0


# One key's answer to Reserve: (LeaseOutcome value, lease id, slot offset, slot size_bytes, expires_unix_ms); all but
# the outcome mean something for GRANTED only. A plain tuple: hundreds per call, and a record each cost more than the call.
LeaseRow = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class Reservation:
    """Reserve's answer, one LeaseRow per key in request order."""

    leases: list[LeaseRow]


@dataclass(frozen=True)
class PinGrant:
    """Pin's answer: one pin over the pinned blocks' slots, by column, in request order."""

    pin_id: int  # 0 when nothing was pinned
    expires_unix_ms: int
    offsets: Sequence[int]
    sizes: Sequence[int]
    checksums: Sequence[int]
    tiers: Sequence[int] = ()  # each block's fastest tier, when some block has an HBM copy; empty otherwise
    hbm_offsets: Sequence[int] = ()  # their offsets in the HBM pool (0 where none)
    hbm_pool_id: int = 0
    payload_bytes: int | None = None  # the sizes' sum, where the channel had it at hand

    def total_bytes(self) -> int:
        return sum(self.sizes) if self.payload_bytes is None else self.payload_bytes


@dataclass(frozen=True)
class TierUsage:
    capacity_bytes: int
    used_bytes: int
    blocks: int


@dataclass(frozen=True)
class StoreStats:
    tiers: dict[Tier, TierUsage]
    blocks: int
    leases_held: int
    pins_held: int
    counters: dict[str, int]


class ControlChannel(Protocol):
    """KVClient's control calls. timeout_s=None: the channel's default deadline."""

    path: str  # "grpc" or "local"

    def lookup(self, fingerprint_id: bytes, keys: Sequence[bytes], timeout_s: float | None = None) -> tuple[list[KeyStatus], int]: ...
    def prefix_length(self, fingerprint_id: bytes, keys: Sequence[bytes], timeout_s: float | None = None) -> int: ...
    def contains(self, fingerprint_id: bytes, keys: Sequence[bytes], timeout_s: float | None = None) -> bytes: ...
    def acquire(self, fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0, timeout_s: float | None = None) -> list[LeaseInfo]: ...
    def renew(self, lease_ids: Sequence[int], ttl_ms: int = 0, timeout_s: float | None = None) -> list[int]: ...
    def release(self, lease_ids: Sequence[int], timeout_s: float | None = None) -> int: ...
    def wait(self, fingerprint_id: bytes, keys: Sequence[bytes], wait_ms: int, timeout_s: float | None = None) -> list[BlockState]: ...
    def reserve(self, fingerprint_id: bytes, keys: Sequence[bytes], sizes: Sequence[int], durable: bool = False, ttl_ms: int = 0,
                timeout_s: float | None = None) -> Reservation: ...
    def commit(self, fingerprint_id: bytes, lease_ids: Sequence[int], checksums: Sequence[int], durable: bool = False,
               timeout_s: float | None = None) -> list[PutOutcome]: ...
    def pin(self, fingerprint_id: bytes, keys: Sequence[bytes], release_pin_ids: Sequence[int] = (), prefix_only: bool = False,
            ttl_ms: int = 0, timeout_s: float | None = None) -> PinGrant: ...
    def unpin(self, pin_ids: Sequence[int], timeout_s: float | None = None) -> int: ...
    def delete(self, fingerprint_id: bytes, keys: Sequence[bytes], timeout_s: float | None = None) -> int: ...
    def stats(self, timeout_s: float | None = None) -> StoreStats: ...
    def data_plane(self, timeout_s: float | None = None) -> DataPlaneInfo: ...
    def close(self) -> None: ...


class ProtoControl:
    """The typed calls over the KVStore service's messages; a channel supplies call() (unary, status -> domain error)."""

    path = ""
    timeout_s = 30.0

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        raise NotImplementedError

    def lookup(self, fingerprint_id, keys, timeout_s=None):
        resp = self.call("Lookup", pb.LookupRequest(fingerprint_id=fingerprint_id, keys=list(keys)), timeout_s)
        statuses = [KeyStatus(BlockKey(s.key), BlockState(s.state), Tier(s.tier), s.size_bytes, s.lease_owner, s.lease_expires_unix_ms)
                    for s in resp.statuses]
        return statuses, resp.prefix_length

    def prefix_length(self, fingerprint_id, keys, timeout_s=None):
        return self.call("Lookup", pb.LookupRequest(fingerprint_id=fingerprint_id, keys=list(keys), prefix_only=True), timeout_s).prefix_length

    def contains(self, fingerprint_id, keys, timeout_s=None):
        """One byte a key, 1 where it is present: a Lookup answered with a byte string, not a status a key."""
        present = self.call("Lookup", pb.LookupRequest(fingerprint_id=fingerprint_id, keys=list(keys), present_only=True), timeout_s).present
        if len(present) != len(keys):
            raise TransferError(f"server answered {len(present)} presence flags for {len(keys)} keys")
        return present

    def acquire(self, fingerprint_id, keys, ttl_ms=0, timeout_s=None):
        resp = self.call("AcquireLeases", pb.AcquireLeasesRequest(fingerprint_id=fingerprint_id, keys=list(keys), ttl_ms=ttl_ms), timeout_s)
        return [LeaseInfo(BlockKey(l.key), LeaseOutcome(l.outcome), l.lease_id, l.owner, l.expires_unix_ms) for l in resp.leases]

    def renew(self, lease_ids, ttl_ms=0, timeout_s=None):
        return list(self.call("RenewLeases", pb.RenewLeasesRequest(lease_ids=list(lease_ids), ttl_ms=ttl_ms), timeout_s).expires_unix_ms)

    def release(self, lease_ids, timeout_s=None):
        return self.call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=list(lease_ids)), timeout_s).released

    def wait(self, fingerprint_id, keys, wait_ms, timeout_s=None):
        resp = self.call("Wait", pb.WaitRequest(fingerprint_id=fingerprint_id, keys=list(keys), timeout_ms=wait_ms), timeout_s)
        return [BlockState(s.state) for s in resp.statuses]

    def reserve(self, fingerprint_id, keys, sizes, durable=False, ttl_ms=0, timeout_s=None):
        specs = [pb.BlockSpec(key=k, size_bytes=n) for k, n in zip(keys, sizes)]
        request = pb.ReserveRequest(fingerprint_id=fingerprint_id, blocks=specs, durable=durable, ttl_ms=ttl_ms)
        rows = []
        for lease in self.call("Reserve", request, timeout_s).leases:
            slot = lease.slot
            rows.append((lease.outcome, lease.lease_id, slot.offset, slot.length, lease.expires_unix_ms))
        return Reservation(rows)

    def commit(self, fingerprint_id, lease_ids, checksums, durable=False, timeout_s=None):
        items = [pb.CommitItem(lease_id=i, checksum=c) for i, c in zip(lease_ids, checksums)]
        resp = self.call("Commit", pb.CommitRequest(fingerprint_id=fingerprint_id, durable=durable, items=items), timeout_s)
        return [PutOutcome(o) for o in resp.outcomes]

    def pin(self, fingerprint_id, keys, release_pin_ids=(), prefix_only=False, ttl_ms=0, timeout_s=None):
        request = pb.PinRequest(fingerprint_id=fingerprint_id, keys=keys, release_pin_ids=release_pin_ids,
                                prefix_only=prefix_only, ttl_ms=ttl_ms)
        resp = self.call("Pin", request, timeout_s)
        # [:] copies a packed column to a list in C, ~3x faster than iterating it (tuple(), zip) from Python
        return PinGrant(resp.pin_id, resp.expires_unix_ms, tuple(resp.offsets[:]), tuple(resp.lengths[:]), tuple(resp.checksums[:]),
                        tuple(resp.tiers[:]), tuple(resp.hbm_offsets[:]), resp.hbm_pool_id)

    def unpin(self, pin_ids, timeout_s=None):
        return self.call("Unpin", pb.UnpinRequest(pin_ids=list(pin_ids)), timeout_s).released

    def delete(self, fingerprint_id, keys, timeout_s=None):
        return self.call("Delete", pb.DeleteRequest(fingerprint_id=fingerprint_id, keys=list(keys)), timeout_s).deleted

    def stats(self, timeout_s=None):
        resp = self.call("Stats", pb.StatsRequest(), timeout_s)
        tiers = {Tier(t.tier): TierUsage(t.capacity_bytes, t.used_bytes, t.blocks) for t in resp.tiers}
        return StoreStats(tiers, resp.blocks, resp.leases_held, resp.pins_held, dict(resp.counters))

    def data_plane(self, timeout_s=None):
        r = self.call("DataPlane", pb.DataPlaneRequest(), timeout_s)
        return DataPlaneInfo(r.host_id, r.shm_name, r.shm_size, r.ucx_listener, r.ucx_session_token, r.ucx_session_tenant,
                             r.max_block_bytes, r.local_control_socket, r.hbm_device_uuid, r.hbm_handle_file, r.hbm_size, r.hbm_pool_id)

    def close(self) -> None:
        pass


class GrpcControl(ProtoControl):
    """The control channel over gRPC; also the calls that stay on gRPC whatever carries the unary ones
    (streams, and inline payloads: transports/grpc_inline.py)."""

    path = "grpc"

    def __init__(self, address: str, metadata: Metadata, timeout_s: float = 30.0, tls_ca: str | None = None) -> None:
        if tls_ca:
            with open(tls_ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            self._channel = grpc.secure_channel(address, creds, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._raw_calls: dict[tuple[str, str], Any] = {}
        self.address, self.metadata, self.timeout_s = address, metadata, timeout_s

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self.metadata, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def call_bytes(self, method: str, request: bytes | Iterator[bytes], response_class: Any, timeout_s: float | None = None) -> Any:
        """A unary or client-streaming call (Put, Write) whose request is already wire bytes (kvwire/payload_codec.py)."""
        streaming = not isinstance(request, bytes)
        call = self._raw(method, f"{'stream' if streaming else 'unary'}_unary", response_class.FromString)
        try:
            return call(request, metadata=self.metadata, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream_bytes(self, method: str, request: Any, timeout_s: float | None = None) -> Iterator[bytes]:
        """A server-streaming call's answers (Get) as their wire bytes, errors mapped as they arrive; closing the
        iterator early cancels the call."""
        call = self._raw(method, "unary_stream", None, type(request).SerializeToString)
        responses = call(request, metadata=self.metadata, timeout=self.timeout_s if timeout_s is None else timeout_s)
        try:
            yield from responses
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            responses.cancel()  # a no-op once the call has ended

    def _raw(self, method: str, kind: str, deserialize: Any, serialize: Any = None) -> Any:
        """A multi-callable for method that leaves the payload side's bytes alone (serializer None), made once."""
        key = (method, kind)
        call = self._raw_calls.get(key)
        if call is None:
            call = getattr(self._channel, kind)(f"/{_SERVICE}/{method}", request_serializer=serialize, response_deserializer=deserialize)
            self._raw_calls[key] = call
        return call

    def close(self) -> None:
        self._channel.close()
