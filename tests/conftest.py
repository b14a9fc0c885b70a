"""Shared fixtures: real server processes on loopback, with tmp_path data directories."""
from __future__ import annotations

import pytest

from kvwire.keys import Fingerprint
from tests.serverproc import ServerProc


def make_fingerprint(**overrides) -> Fingerprint:
    base = dict(model="test-llama", revision="r1", num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16, dtype="float16")
    base.update(overrides)
    return Fingerprint(**base)


@pytest.fixture
def fingerprint() -> Fingerprint:
    return make_fingerprint()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProc:
    """One shared server for tests that only need a working store."""
    srv = ServerProc(tmp_path_factory.mktemp("shared") / "data", flags={"host_memory": "512MiB", "ssd_capacity": "2GiB", "lease_ttl_s": 2})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path):
    """Factory for a private server with its own flags; stopped at teardown."""
    started: list[ServerProc] = []

    def start(name: str = "data", **flags) -> ServerProc:
        srv = ServerProc(tmp_path / name, flags=flags)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()
