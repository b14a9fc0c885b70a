"""The UCX data plane's trust boundary: a session reaches only its own tenant's pins and leases, whatever
client id it claims, its errors name nobody else, and its listener is no wider than --listen."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvclient import KVClient, SlotRef, TransferStats
from kvclient.errors import LeaseError, TransferError, UnauthenticatedError
from kvclient.transports.ucx import UcxTransport
from kvwire import ucx_wire as wire
from kvwire.types import LeaseOutcome, PutOutcome
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.conftest import make_fingerprint
from tests.kvclient.transport_util import HAVE_UCX, UCX_SERVER_ENV, random_blocks, tokens
from tests.kvstore.admin_util import auth_flags
from tests.serverproc import ServerProc

pytestmark = [pytest.mark.ucx, pytest.mark.skipif(not HAVE_UCX, reason="ucxx not importable"), pytest.mark.timeout(120)]
BLOCK = 64 << 10


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc (no tool needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host order
            found.add((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.fixture
def auth_server(tmp_path):
    srv = ServerProc(tmp_path / "data", flags=auth_flags(tmp_path, host_memory="64MiB", persist_on_shutdown=False), env=UCX_SERVER_ENV)
    srv.start()
    yield srv
    srv.stop()


def session_claiming(srv: ServerProc, token: str, client_id: str) -> pb.DataPlaneResponse:
    with grpc.insecure_channel(srv.address) as channel:
        return pb_grpc.KVStoreStub(channel).DataPlane(
            pb.DataPlaneRequest(), metadata=(("authorization", f"Bearer {token}"), ("kvstore-client-id", client_id)), timeout=10)


def ucx_as(info: pb.DataPlaneResponse, client_id: str) -> UcxTransport:
    """A UCX session of its own, whose reads and writes name pin and lease ids the test chose instead of
    pinning or reserving: what a hostile client's own control code would do."""
    host, _, port = info.ucx_listener.rpartition(":")
    return UcxTransport(host, int(port), client_id, info.ucx_session_token, 10, tenant=info.ucx_session_tenant)


def test_a_session_claiming_another_tenants_client_id_reaches_none_of_its_pins_or_leases(auth_server):
    fp = make_fingerprint()
    with KVClient(auth_server.address, fp, token="bob-secret", transport="ucx") as bob:
        keys = bob.block_keys(tokens(2, start=9_000_000))
        blocks = random_blocks(1, BLOCK, seed=11)
        assert bob.put(keys[:1], blocks) == [PutOutcome.STORED]
        pin_id = bob.pin(keys[:1]).pin_id  # held, never released: alice tries to read it
        outcome, lease_id, *_ = bob.control.reserve(fp.id, [keys[1].digest], [BLOCK]).leases[0]
        assert outcome == LeaseOutcome.GRANTED

        info = session_claiming(auth_server, "alice-secret", bob.client_id)
        assert info.ucx_session_tenant == "alice"  # the token's tenant, whatever client id was claimed
        received = np.zeros(BLOCK, np.uint8)
        alice = ucx_as(info, bob.client_id)
        try:
            with pytest.raises(LeaseError) as refused:
                alice.read([keys[0].digest], [SlotRef(0, 0, BLOCK, handle=pin_id, checksum=0)], [received], TransferStats())
            assert not received.any(), "bob's bytes reached alice"
            assert "bob" not in str(refused.value) and bob.client_id not in str(refused.value)
            with pytest.raises(LeaseError) as refused:
                alice.write([keys[1].digest], [SlotRef(0, 0, BLOCK, handle=lease_id, checksum=0)], [np.full(BLOCK, 0xAA, np.uint8)],
                            TransferStats())
            assert "bob" not in str(refused.value) and bob.client_id not in str(refused.value)
        finally:
            alice.close()

        # Bob's pin and lease are untouched: his own data plane still serves the one and fills the other.
        assert bob.control.unpin([pin_id]) == 1
        assert bob.control.release([lease_id]) == 1
        assert np.array_equal(bob.get(keys[:1])[0], blocks[0])


def test_a_hello_naming_another_tenant_than_its_session_token_is_refused(auth_server):
    info = session_claiming(auth_server, "alice-secret", "alice-1")
    with pytest.raises(UnauthenticatedError, match="session token") as refused:
        ucx_as(pb.DataPlaneResponse(ucx_listener=info.ucx_listener, ucx_session_token=info.ucx_session_token,
                                    ucx_session_tenant="bob"), "alice-1")
    assert "alice" not in str(refused.value)


def test_with_a_loopback_listen_address_nothing_listens_beyond_loopback(tmp_path):
    """ucxx can only listen on every interface: a server told to listen on 127.0.0.1 runs without UCX
    (same-host clients use shm) rather than open a port on every interface."""
    env = {**UCX_SERVER_ENV, "KVSTORE_UCX_ALL_INTERFACES": "false"}
    srv = ServerProc(tmp_path / "data", flags={"host_memory": "64MiB", "persist_on_shutdown": False}, env=env).start()
    try:
        addresses = listening_addresses(srv.proc.pid)
        assert addresses and all(loopback(ip) for ip, _ in addresses), addresses
        with KVClient(srv.address, make_fingerprint(), tenant="local") as client:
            assert client.transport.name == "shm"
        assert "UCX data plane off" in srv.log()
    finally:
        srv.stop()


def test_every_interface_when_configured_so(tmp_path):
    srv = ServerProc(tmp_path / "data", flags={"host_memory": "64MiB", "persist_on_shutdown": False, "ucx_all_interfaces": True},
                     env=UCX_SERVER_ENV).start()
    try:
        with KVClient(srv.address, make_fingerprint(), tenant="wide", transport="ucx") as client:
            port = client.transport.port
            keys = client.block_keys(tokens(1))
            client.put(keys, random_blocks(1, BLOCK))
            assert len(client.get(keys)[0]) == BLOCK
        assert ("0.0.0.0", port) in listening_addresses(srv.proc.pid) or ("::", port) in listening_addresses(srv.proc.pid)
        assert "every interface" in srv.log()
    finally:
        srv.stop()


def test_a_request_with_flag_bits_the_server_does_not_know_ends_only_that_connection(auth_server):
    """The op word's bits above the op are flags (FLAG_FROM_HBM); any other bit is a protocol error: the server drops
    that endpoint, as for an unknown op, serves nothing for it, and serves the same session's next connection."""
    fingerprint = make_fingerprint()
    with KVClient(auth_server.address, fingerprint, token="alice-secret", transport="ucx") as alice:
        keys = alice.block_keys(tokens(1))
        blocks = random_blocks(1, BLOCK)
        assert alice.put(keys, blocks) == [PutOutcome.STORED]
        transport = alice.transport
        reply = wire.empty_header()

        def odd_request(ep, deadline: float) -> None:
            transport.worker.wait([ep.send(wire.header(wire.OP_GET | (1 << 20), 1, 1, 0)), ep.recv(reply)], deadline)

        with pytest.raises(TransferError):
            transport._request(odd_request, TransferStats(), keep_on_refusal=False, timeout_s=10)
        assert not reply.any()  # nothing was answered for it
        out = [np.zeros(BLOCK, np.uint8)]
        alice.get(keys, out=out)  # a new connection, served as before
        assert np.array_equal(out[0], blocks[0])
