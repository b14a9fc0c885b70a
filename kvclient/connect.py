"""The factory behind KVClient: which control path and which transport a client uses, decided once.

connect() asks the server over gRPC to describe its data plane (DataPlane), then decides:
  * the control path: the server's local control socket when the server is on this host and
    advertises one, else gRPC;
  * the transport: "auto" tries shm, then UCX, then inline gRPC; an explicit choice must work.
It returns a Connection holding what it built; KVClient is assembled from that and nothing
changes it afterwards. Every decision and fallback reason is kept in a TransportChoice
(KVClient.stats()["client"]) and logged at debug level, so a slow client can be traced to
"fell back to grpc because ...". The decisions are plain functions of the DataPlane answer
(choose_control, choose_transport), testable without a server.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

from kvclient.control import ClientIdentity, ControlChannel, DataPlaneInfo, GrpcControl
from kvclient.errors import InvalidRequestError, KVStoreError, UnavailableError
from kvclient.transports.base import Transport
from kvwire.hostid import host_id

log = logging.getLogger(__name__)

ORDER = {"auto": ("shm", "ucx", "grpc"), "shm": ("shm",), "ucx": ("ucx",), "grpc": ("grpc",)}
NO_DATA_PLANE = "server did not describe its data plane"

TransportBuilder = Callable[[DataPlaneInfo | None], Transport]


@dataclass(frozen=True)
class TransportChoice:
    requested: str
    chosen: str
    fallbacks: tuple[str, ...] = ()  # "shm: <why not>", in the order tried
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


@dataclass(frozen=True)
class Connection:
    """What a client talks through: its control channel, the gRPC channel beneath (streams and inline
    payloads stay on it), the transport, why these were chosen, and the server's DataPlane answer
    (None when it gave none)."""

    control: ControlChannel
    grpc: GrpcControl
    transport: Transport
    choice: TransportChoice
    data_plane: DataPlaneInfo | None = None

    def close(self) -> None:
        self.transport.close()
        if self.control is not self.grpc:
            self.control.close()
        self.grpc.close()


def _same_host(info: DataPlaneInfo) -> None:
    if info.host_id != host_id():
        raise UnavailableError("server is on another host")


def choose_control(info: DataPlaneInfo | None, requested: str, allowed: bool,
                   open_local: Callable[[DataPlaneInfo], ControlChannel]) -> tuple[ControlChannel | None, str]:
    """The local control channel, or None and why not (then control calls go over gRPC)."""
    try:
        if not allowed:
            raise UnavailableError("turned off by the client (local_control=False)")
        if info is None:
            raise UnavailableError(NO_DATA_PLANE if requested != "grpc" else "transport 'grpc' keeps every call on gRPC")
        _same_host(info)
        if not info.local_control_socket:
            raise UnavailableError("server advertises no local control socket (local_control is off there)")
        return open_local(info), ""
    except KVStoreError as err:
        log.debug("kvclient control calls over gRPC: %s", err)
        return None, str(err)


def choose_transport(info: DataPlaneInfo | None, requested: str, builders: Mapping[str, TransportBuilder],
                     fallbacks: list[str]) -> tuple[str, Transport]:
    """The first transport of the requested order that starts; each one that does not adds its reason to fallbacks."""
    for name in ORDER[requested]:
        try:
            if info is None and name != "grpc":
                raise UnavailableError(NO_DATA_PLANE)
            transport = builders[name](info)
        except (KVStoreError, OSError, ValueError) as err:
            fallbacks.append(f"{name}: {err}")
            log.debug("kvclient transport %s unavailable: %s", name, err)
            continue
        return name, transport
    raise UnavailableError(f"transport {requested!r} is not usable here: " + "; ".join(fallbacks))


def _shm(info: DataPlaneInfo) -> Transport:
    from kvclient.transports.shm import ShmTransport

    if not info.shm_name:
        raise UnavailableError("server publishes no shared-memory pool")
    _same_host(info)
    return ShmTransport(info.shm_name, info.shm_size)


def _ucx(info: DataPlaneInfo, address: str, identity: ClientIdentity, timeout_s: float) -> Transport:
    from kvclient.transports.ucx import UcxTransport

    if not info.ucx_listener:
        raise UnavailableError("server runs no UCX listener")
    host, _, port = info.ucx_listener.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = address.rpartition(":")[0]  # the listener is on every interface; use the one we reached
    return UcxTransport(host.strip("[]"), int(port), identity.client_id, info.ucx_session_token, timeout_s,
                        tenant=info.ucx_session_tenant)


def builders(address: str, identity: ClientIdentity, grpc_control: GrpcControl, timeout_s: float) -> dict[str, TransportBuilder]:
    from kvclient.transports.grpc_inline import GrpcInlineTransport

    return {
        "shm": _shm,
        "ucx": lambda info: _ucx(info, address, identity, timeout_s),
        # Payload rides in these calls, so they stay on gRPC: the local socket carries control calls only.
        "grpc": lambda info: GrpcInlineTransport(grpc_control),
    }


def connect(address: str, identity: ClientIdentity, transport: str = "auto", local_control: bool = True,
            timeout_s: float = 30.0, tls_ca: str | None = None) -> Connection:
    """Open the channels and the transport a client at address should use; raises UnavailableError if the
    requested transport cannot work here, InvalidRequestError for a transport name that does not exist."""
    if transport not in ORDER:
        raise InvalidRequestError(f"transport must be one of {', '.join(ORDER)}; got {transport!r}")
    from kvclient.local_control import open_local

    grpc_control = GrpcControl(address, identity.metadata(), timeout_s, tls_ca)
    control: ControlChannel | None = None
    try:
        fallbacks: list[str] = []
        info = None
        if transport != "grpc":
            try:
                info = grpc_control.data_plane()
            except KVStoreError as err:
                fallbacks.append(f"dataplane: {type(err).__name__}: {err}")
        control, why_not_local = choose_control(info, transport, local_control,
                                                lambda i: open_local(i, identity.metadata(), grpc_control, timeout_s))
        chosen, mover = choose_transport(info, transport, builders(address, identity, grpc_control, timeout_s), fallbacks)
    except BaseException:
        if control is not None:
            control.close()
        grpc_control.close()
        raise
    choice = TransportChoice(transport, chosen, tuple(fallbacks), "local" if control else "grpc", why_not_local)
    log.debug("kvclient transport: %s (requested %s; fallbacks: %s); control: %s", chosen, transport,
              "; ".join(fallbacks) or "none", choice.control)
    return Connection(control or grpc_control, grpc_control, mover, choice, info)
