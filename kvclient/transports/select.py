"""Which transport a KVClient uses: "auto" tries shm, then UCX, then inline gRPC; explicit choices must work.

Also which path its unary control calls take: the server's local control socket when
the server is on this host and advertises one, else gRPC. That is decided first, since
every transport's control half (PoolControl) calls through the client's stub.

The decisions and every fallback reason are kept in a TransportChoice (exposed in
KVClient.stats()["client"]) and logged at debug level, so a slow client can be
traced to "fell back to grpc because ...".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from kvclient.errors import InvalidRequestError, KVStoreError, UnavailableError
from kvwire.hostid import host_id
from kvclient.transports.base import Transport
from kvclient.transports.grpc_inline import GrpcInlineTransport
from kvclient.transports.pooled import PoolControl
from kvwire.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

ORDER = {"auto": ("shm", "ucx", "grpc"), "shm": ("shm",), "ucx": ("ucx",), "grpc": ("grpc",)}


@dataclass
class TransportChoice:
    requested: str
    chosen: str = ""
    fallbacks: list[str] = field(default_factory=list)  # "shm: <why not>", in the order tried
    control: str = "grpc"  # the path of unary control calls: "local" (Unix socket) or "grpc"
    control_fallback: str = ""  # why not "local"

    def as_dict(self) -> dict:
        return {
            "transport": self.chosen,
            "transport_requested": self.requested,
            "transport_fallbacks": list(self.fallbacks),
            "control": self.control,
            "control_fallback": self.control_fallback,
        }


def _same_host(info: pb.DataPlaneResponse) -> None:
    if info.host_id != host_id():
        raise UnavailableError("server is on another host")


def _local_control(client, info: pb.DataPlaneResponse | None, record: TransportChoice) -> None:
    """Send the client's unary calls over the server's local control socket when it can; record why not."""
    from kvclient.local_control import connect

    try:
        if not client.local_control:
            raise UnavailableError("turned off by the client (local_control=False)")
        if info is None:
            raise UnavailableError("server did not describe its data plane" if record.requested != "grpc" else "transport 'grpc' keeps every call on gRPC")
        _same_host(info)
        if not info.local_control_socket:
            raise UnavailableError("server advertises no local control socket (local_control is off there)")
        client.stub = connect(info.local_control_socket, client.grpc_stub, client._call, info)
    except KVStoreError as err:
        record.control, record.control_fallback = "grpc", str(err)
        log.debug("kvclient control calls over gRPC: %s", err)
        return
    record.control = "local"


def _shm(client, info: pb.DataPlaneResponse) -> Transport:
    from kvclient.transports.shm import ShmTransport

    if not info.shm_name:
        raise UnavailableError("server publishes no shared-memory pool")
    _same_host(info)
    return ShmTransport(PoolControl(client.stub, client.fingerprint_id, client._call, client._metadata), info.shm_name, info.shm_size)


def _ucx(client, info: pb.DataPlaneResponse) -> Transport:
    from kvclient.transports.ucx import UcxTransport

    if not info.ucx_listener:
        raise UnavailableError("server runs no UCX listener")
    host, _, port = info.ucx_listener.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = client.address.rpartition(":")[0]  # the listener is on every interface; use the one we reached
    control = PoolControl(client.stub, client.fingerprint_id, client._call, client._metadata)
    return UcxTransport(control, host.strip("[]"), int(port), client.client_id, info.ucx_session_token, client.timeout_s,
                        tenant=info.ucx_session_tenant)


def _grpc(client, info: pb.DataPlaneResponse | None) -> Transport:
    # Payload rides in these calls, so they stay on gRPC: the local socket carries control calls only.
    return GrpcInlineTransport(client.grpc_stub, client.fingerprint_id, client._call)


BUILDERS: dict[str, Callable] = {"shm": _shm, "ucx": _ucx, "grpc": _grpc}


def choose(client, choice: str) -> Transport:
    if choice not in ORDER:
        raise InvalidRequestError(f"transport must be one of {', '.join(ORDER)}; got {choice!r}")
    record = TransportChoice(choice)
    info = None
    if choice != "grpc":
        try:
            info = client._call(client.stub.DataPlane, pb.DataPlaneRequest())
        except KVStoreError as err:
            record.fallbacks.append(f"dataplane: {type(err).__name__}: {err}")
    _local_control(client, info, record)
    for name in ORDER[choice]:
        try:
            if info is None and name != "grpc":
                raise UnavailableError("server did not describe its data plane")
            transport = BUILDERS[name](client, info)
        except (KVStoreError, OSError, ValueError) as err:
            record.fallbacks.append(f"{name}: {err}")
            log.debug("kvclient transport %s unavailable: %s", name, err)
            continue
        record.chosen = name
        client.transport_choice = record
        log.debug("kvclient transport: %s (requested %s; fallbacks: %s); control: %s", name, choice, "; ".join(record.fallbacks) or "none", record.control)
        return transport
    raise UnavailableError(f"transport {choice!r} is not usable here: " + "; ".join(record.fallbacks))
