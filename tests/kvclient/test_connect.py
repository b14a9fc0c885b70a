"""The factory (kvclient/connect.py), in process: every reason a control path or a transport is not taken is
recorded, in order, and the client is assembled from what the factory returns and never changed afterwards."""
from __future__ import annotations

import dataclasses

import pytest

import kvclient.client
from kvclient import KVClient
from kvclient.connect import NO_DATA_PLANE, Connection, TransportChoice, builders, choose_control, choose_transport
from kvclient.control import ClientIdentity, DataPlaneInfo
from kvclient.errors import InvalidRequestError, UnavailableError
from kvclient.transports.base import Transport
from kvwire.hostid import host_id
from tests.conftest import make_fingerprint

HERE = DataPlaneInfo(host_id=host_id(), shm_name="kvstore-test-pool", shm_size=1 << 20, ucx_listener="0.0.0.0:7481",
                     local_control_socket="/run/kvstore-test.sock")


class Channel:
    path = "local"

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Mover(Transport):
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def refuse(reason: str, error: type[Exception] = UnavailableError):
    def build(info):
        raise error(reason)
    return build


@pytest.mark.parametrize("info, requested, allowed, reason", [
    (HERE, "auto", False, "turned off by the client (local_control=False)"),
    (None, "auto", True, NO_DATA_PLANE),
    (None, "grpc", True, "transport 'grpc' keeps every call on gRPC"),
    (dataclasses.replace(HERE, host_id="elsewhere/boot"), "auto", True, "server is on another host"),
    (dataclasses.replace(HERE, local_control_socket=""), "shm", True, "server advertises no local control socket (local_control is off there)"),
])
def test_each_reason_not_to_use_the_local_socket_is_recorded(info, requested, allowed, reason):
    opened = []
    channel, why_not = choose_control(info, requested, allowed, lambda i: opened.append(i) or Channel())
    assert (channel, why_not, opened) == (None, reason, [])


def test_the_local_socket_is_used_when_it_answers_as_the_server_does():
    channel, why_not = choose_control(HERE, "auto", True, lambda info: Channel())
    assert isinstance(channel, Channel) and why_not == ""
    channel, why_not = choose_control(HERE, "auto", True, refuse("/run/kvstore-test.sock answers for another server"))
    assert channel is None and why_not == "/run/kvstore-test.sock answers for another server"


def test_transports_are_tried_in_order_and_every_fallback_says_why():
    fallbacks: list[str] = []
    made = {"shm": refuse("server publishes no shared-memory pool"), "ucx": refuse("ucxx not importable: no module", OSError),
            "grpc": lambda info: Mover("grpc")}
    name, mover = choose_transport(HERE, "auto", made, fallbacks)
    assert name == "grpc" and mover.name == "grpc"
    assert fallbacks == ["shm: server publishes no shared-memory pool", "ucx: ucxx not importable: no module"]

    fallbacks = []
    name, _ = choose_transport(None, "auto", {**made, "shm": lambda info: Mover("shm")}, fallbacks)
    assert name == "grpc" and fallbacks == [f"shm: {NO_DATA_PLANE}", f"ucx: {NO_DATA_PLANE}"]

    fallbacks = []
    with pytest.raises(UnavailableError, match="transport 'ucx' is not usable here: ucx: server runs no UCX listener"):
        choose_transport(HERE, "ucx", {**made, "ucx": refuse("server runs no UCX listener", ValueError)}, fallbacks)
    with pytest.raises(ZeroDivisionError):  # a bug in a transport is not a reason to fall back
        choose_transport(HERE, "auto", {**made, "shm": lambda info: 1 / 0}, [])


def test_the_real_builders_refuse_with_their_reasons():
    made = builders("10.0.0.1:7480", ClientIdentity("me"), None, timeout_s=1)
    cases = [
        ("shm", dataclasses.replace(HERE, shm_name=""), "server publishes no shared-memory pool"),
        ("shm", dataclasses.replace(HERE, host_id="elsewhere/boot"), "server is on another host"),
        ("shm", dataclasses.replace(HERE, shm_name="kvstore-no-such-pool"), "cannot open the host pool"),
        ("ucx", dataclasses.replace(HERE, ucx_listener=""), "server runs no UCX listener"),
    ]
    for name, info, reason in cases:
        with pytest.raises(UnavailableError, match=reason):
            made[name](info)


def test_the_client_is_assembled_from_the_factory_and_never_changed(monkeypatch):
    control, grpc_channel, mover = Channel(), Channel(), Mover("shm")
    choice = TransportChoice("auto", "shm", ("ucx: not tried",), "local", "")
    asked = []

    def connect(address, identity, transport, local_control, timeout_s, tls_ca):
        asked.append((address, identity.client_id, transport, local_control))
        return Connection(control, grpc_channel, mover, choice)

    monkeypatch.setattr(kvclient.client, "connect", connect)
    client = KVClient("somewhere:1", make_fingerprint(), tenant="t", transport="auto")
    assert asked == [("somewhere:1", client.client_id, "auto", True)]
    assert client.transport is mover and client.control is control and client.transport_choice is choice
    for name, value in (("transport", Mover("grpc")), ("control", Channel()), ("transport_choice", choice)):
        with pytest.raises(AttributeError):
            setattr(client, name, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        client._conn.transport = Mover("grpc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.chosen = "grpc"
    client.close()
    assert mover.closed and control.closed and grpc_channel.closed


def test_an_unknown_transport_name_is_refused_before_any_connection():
    with pytest.raises(InvalidRequestError, match="transport must be one of auto, shm, ucx, grpc"):
        KVClient("127.0.0.1:1", make_fingerprint(), transport="carrier-pigeon")
