"""KVClient.contains: one Lookup a batch answered with a byte a key (LookupRequest.present_only), over gRPC and the
local control socket; the same answer as a full lookup, and never another tenant's or another fingerprint's block."""
from __future__ import annotations

import numpy as np
import pytest

import kvclient.client
from kvclient import KVClient
from kvclient.errors import InvalidRequestError
from kvwire.types import BlockState
from tests.conftest import make_fingerprint
from tests.kvclient.transport_util import random_blocks, tokens
from tests.kvstore.admin_util import auth_flags

CONTROL_PATHS = ["grpc", "local"]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    from tests.serverproc import ServerProc

    directory = tmp_path_factory.mktemp("contains")
    srv = ServerProc(directory / "data", flags=auth_flags(directory, host_memory="64MiB", ssd_capacity="128MiB", max_keys_per_request=64))
    srv.start()
    yield srv
    srv.stop()


def client_of(srv, token: str, path: str, fingerprint=None, client_id: str | None = "engine-0") -> KVClient:
    # transport grpc keeps every call on gRPC; shm lets control calls take the local socket
    client = KVClient(srv.address, fingerprint or make_fingerprint(), token=token, transport="shm" if path == "local" else "grpc",
                      local_control=path == "local", client_id=client_id)
    assert client.stats()["client"]["control"] == path
    return client


@pytest.mark.parametrize("path", CONTROL_PATHS)
def test_contains_agrees_with_lookup_on_present_missing_and_pending_keys(auth_server, path):
    with client_of(auth_server, "alice-secret", path) as alice:
        keys = alice.block_keys(tokens(12, start=1000 * CONTROL_PATHS.index(path)))
        stored = [0, 1, 2, 5, 8, 11]
        alice.put([keys[i] for i in stored], random_blocks(len(stored), 4096))
        alice.acquire([keys[3], keys[9]])  # pending: leased, not present
        present = alice.contains(keys)
        assert present == [i in stored for i in range(12)]
        statuses, prefix = alice.status(keys)
        assert present == [s.state == BlockState.PRESENT for s in statuses]
        assert prefix == 3 == alice.lookup(keys)
        assert alice.contains([]) == []


@pytest.mark.parametrize("path", CONTROL_PATHS)
def test_another_tenants_keys_are_never_reported_present(auth_server, path):
    """Bob names Alice's exact keys, with her client id and her fingerprint: all absent for him, present for her."""
    with client_of(auth_server, "alice-secret", path) as alice, client_of(auth_server, "bob-secret", path) as bob:
        keys = alice.block_keys(tokens(6, start=50_000 + 1000 * CONTROL_PATHS.index(path)))
        alice.put(keys[:4], random_blocks(4, 4096))
        assert bob.contains(keys) == [False] * 6
        assert alice.contains(keys) == [True] * 4 + [False] * 2
        bob.put(keys[4:], random_blocks(2, 4096, seed=1))  # the same keys under Bob's tenant are Bob's own blocks
        assert bob.contains(keys) == [False] * 4 + [True] * 2
        assert alice.contains(keys) == [True] * 4 + [False] * 2
        with client_of(auth_server, "alice-secret", path, make_fingerprint(model="other")) as other_fp:
            assert other_fp.contains(keys) == [False] * 6  # a block is found only under its own fingerprint


@pytest.mark.parametrize("path", CONTROL_PATHS)
def test_a_large_contains_is_batched_and_each_batch_is_one_call(auth_server, path, monkeypatch):
    monkeypatch.setattr(kvclient.client, "CONTAINS_BATCH_KEYS", 50)  # the server allows 64 keys a request
    with client_of(auth_server, "alice-secret", path, client_id=None) as alice:
        keys = alice.block_keys(tokens(130, start=90_000 + 10_000 * CONTROL_PATHS.index(path)))
        stored = set(range(0, 130, 3))
        alice.put([keys[i] for i in sorted(stored)], [np.full(64, i % 251, np.uint8) for i in sorted(stored)])
        calls = []
        real = alice.control.contains
        monkeypatch.setattr(alice.control, "contains", lambda fp, ks, timeout_s=None: calls.append(len(ks)) or real(fp, ks, timeout_s))
        assert alice.contains(keys) == [i in stored for i in range(130)]
        assert calls == [50, 50, 30]
        with pytest.raises(InvalidRequestError, match="max_keys_per_request"):
            real(alice.fingerprint_id, [k.digest for k in keys[:65]])
