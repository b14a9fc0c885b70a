"""Tenants and tokens against a real server: refusal without a valid token, isolation, the admin role, TLS."""
from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError, KVStoreError, PermissionDeniedError, UnauthenticatedError
from kvwire.types import BlockState, LeaseOutcome, PutOutcome
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from kvwire.v1 import kvstore_pb2 as pb
from tests.kvstore.admin_util import auth_flags, patterned_blocks, run_admin
from tests.serverproc import ServerProc

BLOCK = 8 << 10
PROMPT = list(range(64))  # the same token sequence for every tenant


@pytest.fixture
def srv(make_server, tmp_path):
    return make_server(**auth_flags(tmp_path, host_memory="32MiB", ssd_capacity="64MiB", max_block_bytes="1MiB"))


def test_missing_or_wrong_token_is_refused(srv, fingerprint):
    for token in (None, "not-a-token"):
        with KVClient(srv.address, fingerprint, token=token) as client:
            keys = client.block_keys(PROMPT)
            with pytest.raises(UnauthenticatedError):
                client.lookup(keys)
            with pytest.raises(UnauthenticatedError):
                client.put(keys[:1], [b"x" * BLOCK])
    channel = grpc.insecure_channel(srv.address)
    with channel, pytest.raises(grpc.RpcError) as err:
        apb_grpc.AdminStub(channel).Stats(pb.StatsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A token is good only for its own tenant, whatever tenant the caller claims.
    with KVClient(srv.address, fingerprint, tenant="bob", token="alice-secret") as liar, pytest.raises(PermissionDeniedError):
        liar.lookup(liar.block_keys(PROMPT))


def test_tenants_with_identical_token_sequences_are_isolated(srv, fingerprint):
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice, KVClient(srv.address, fingerprint, token="bob-secret") as bob:
        keys = alice.block_keys(PROMPT)
        assert bob.block_keys(PROMPT) == keys  # no client-side salt: isolation must come from the server
        alice_blocks, bob_blocks = patterned_blocks(4, BLOCK, 1), patterned_blocks(4, BLOCK, 2)
        assert alice.put(keys, alice_blocks) == [PutOutcome.STORED] * 4

        statuses, prefix = bob.status(keys)
        assert prefix == 0 and {s.state for s in statuses} == {BlockState.MISSING}
        with pytest.raises(BlockNotFoundError):
            bob.get(keys[:1])
        assert bob.delete(keys) == 0
        assert bob.put(keys, bob_blocks) == [PutOutcome.STORED] * 4  # not ALREADY_PRESENT: nothing leaks
        assert all(np.array_equal(a, b) for a, b in zip(alice.get(keys), alice_blocks))
        assert all(np.array_equal(a, b) for a, b in zip(bob.get(keys), bob_blocks))

        # An in-flight computation is invisible too: no PENDING state, no shared lease.
        more = alice.block_keys(PROMPT + list(range(100, 116)))[-1:]
        assert alice.acquire(more)[0].outcome == LeaseOutcome.GRANTED
        assert bob.status(more)[0][0].state == BlockState.MISSING
        assert bob.acquire(more)[0].outcome == LeaseOutcome.GRANTED


def test_admin_rpcs_need_the_admin_role(srv, fingerprint):
    for command in (["stats"], ["ls"], ["evict", "--tenant", "bob"], ["delete", "--secure", "--tenant", "bob"], ["leases"], ["leases", "revoke", "1"], ["drain"]):
        proc = run_admin(srv, *command, token="alice-secret")
        assert proc.returncode == 1 and "PERMISSION_DENIED" in proc.stderr, (command, proc.stderr)
    assert run_admin(srv, "stats", token="wrong").returncode == 1
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice:
        # Store-wide counts would reveal other tenants' activity: a tenant sees its own client side only.
        assert set(alice.stats()) == {"client"} and alice.stats()["client"]["transport"] == alice.transport.name
    with KVClient(srv.address, fingerprint, token="admin-secret") as admin:
        assert admin.stats()["blocks"] == 0
    assert srv.proc.poll() is None  # the refused drain did not stop it


def test_serve_without_tokens_needs_explicit_insecure_flag(tmp_path):
    cmd = [sys.executable, "-m", "kvstore.cli", "serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0", "--host-memory", "8MiB", "--max-block-bytes", "1MiB"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--insecure-no-auth" in proc.stderr


class TlsServerProc(ServerProc):
    ca: bytes = b""

    def wait_healthy(self, timeout_s: float) -> None:
        with grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.ca)) as ch:
            grpc.channel_ready_future(ch).result(timeout=timeout_s)
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_from_config(tmp_path, fingerprint):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    config = tmp_path / "tls.toml"
    config.write_text(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\nhost_memory = "16MiB"\nmax_block_bytes = "1MiB"\n')
    srv = TlsServerProc(tmp_path / "data", flags={**auth_flags(tmp_path), "config": config})
    srv.ca = cert.read_bytes()
    srv.start()
    try:
        with KVClient(srv.address, fingerprint, token="alice-secret", tls_ca=str(cert)) as alice:
            keys = alice.block_keys(PROMPT)
            alice.put(keys[:1], [b"t" * BLOCK])
            assert alice.get(keys[:1])[0].tobytes() == b"t" * BLOCK
        stats = run_admin(srv, "--tls-ca", str(cert), "--json", "stats", token="admin-secret")
        assert stats.returncode == 0 and '"blocks": 1' in stats.stdout
        with KVClient(srv.address, fingerprint, token="alice-secret", transport="grpc") as plaintext, pytest.raises(KVStoreError):
            plaintext.lookup(keys)
    finally:
        srv.stop()


def test_an_answer_is_remembered_by_everything_that_decided_it_and_a_refusal_never():
    """Authenticator.caller remembers its answers per (metadata, peer): the same call gets the same caller, a
    different token, tenant claim, client id or anonymous peer is worked out afresh, and a refused call is
    refused every time (a later valid call with other metadata does not inherit anything)."""
    from kvstore.auth import Authenticator, TokenEntry

    auth = Authenticator(False, {"t-alice": TokenEntry("alice"), "t-root": TokenEntry("root", admin=True)})
    alice = (("authorization", "Bearer t-alice"), ("kvstore-client-id", "c1"))
    first = auth.caller(alice, "unix:pid=1")
    assert auth.caller(list(alice), "unix:pid=1") is first and (first.tenant, first.client_id, first.is_admin) == ("alice", "c1", False)
    assert auth.caller((("authorization", "Bearer t-root"), ("kvstore-client-id", "c1")), "unix:pid=1").is_admin
    assert auth.caller((("authorization", "Bearer t-alice"),), "unix:pid=1").client_id != auth.caller((("authorization", "Bearer t-alice"),), "unix:pid=2").client_id
    for _ in range(2):
        with pytest.raises(PermissionDeniedError):
            auth.caller(alice + (("kvstore-tenant", "root"),), "unix:pid=1")
        with pytest.raises(UnauthenticatedError):
            auth.caller((("authorization", "Bearer t-mallory"),), "unix:pid=1")
    assert auth.caller(alice + (("kvstore-tenant", "alice"),), "unix:pid=1").tenant == "alice"
