"""Fixtures for the cluster tests: real etcd servers on loopback (tests/etcdproc.py).

`etcd` is one shared single-member server for tests that leave etcd alone (each test gets its own
cluster name, so their keys never meet); `make_etcd` starts a private one (1 or 3 members) for tests
that pause, kill or restart etcd. Both skip, naming the reason, only when no etcd binary can be had (and fail instead under CI).
"""
from __future__ import annotations

import itertools

import pytest

from tests.etcdproc import EtcdCluster, need_etcd

_names = itertools.count()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory) -> EtcdCluster:
    need_etcd()
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def make_etcd(tmp_path):
    """make_etcd(members=1, host="127.0.0.1") -> a started EtcdCluster, stopped at teardown."""
    need_etcd()
    started: list[EtcdCluster] = []

    def start(members: int = 1, host: str = "127.0.0.1") -> EtcdCluster:
        cluster = EtcdCluster(tmp_path / f"etcd{len(started)}", members=members, host=host)
        started.append(cluster)
        return cluster.start()

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture
def cluster_name(request) -> str:
    """A cluster name no other test uses, so tests can share one etcd."""
    return f"t{next(_names)}-{request.node.name[:40]}".replace("[", "-").replace("]", "")
