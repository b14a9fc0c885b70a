"""A kvstore cluster for tests: N real `kvstore serve` processes on loopback, joined through a real etcd.

With a tests/netns.py Bridge each node runs in a network namespace of its own instead (for partitions);
etcd must then listen on the bridge's root address (EtcdCluster(host=bridge.root_address)).

Each node is a host of its own as far as co-location goes (distinct host_id and KVSTORE_HOST_ID), with
its own data dir and a real token file: tenant tokens for clients, a peer token the nodes present to
each other. The harness reads node state only through the nodes' public doors (KVStore, Admin).
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvclient import KVClient
from kvwire.keys import Fingerprint
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from kvwire.v1 import kvstore_pb2 as pb
from tests.etcdproc import EtcdCluster
from tests.netns import Bridge, Namespace
from tests.serverproc import ServerProc

TENANT_TOKENS = {"alpha": "tok-alpha", "beta": "tok-beta"}
ADMIN_TOKEN = "tok-admin"
# Node flags per data path between nodes: gRPC Fetch only, or the UCX data plane (which on loopback must be
# allowed to listen on every interface) with gRPC as its fallback.
DATA_PATHS = {"grpc": {"ucx": False}, "ucx": {"ucx": True, "ucx_all_interfaces": True}}
PEER_TOKEN = "tok-peer-secret"


def write_token_files(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    tokens = directory / "tokens.toml"
    entries = [f'[[tokens]]\ntoken = "{tok}"\ntenant = "{tenant}"\n' for tenant, tok in TENANT_TOKENS.items()]
    entries.append(f'[[tokens]]\ntoken = "{ADMIN_TOKEN}"\ntenant = "ops"\nadmin = true\n')
    tokens.write_text("\n".join(entries))
    peers = directory / "peers.toml"
    peers.write_text(f'[[peers]]\ntoken = "{PEER_TOKEN}"\n')
    return tokens, peers


@dataclass
class ClusterProcs:
    base: Path
    etcd: EtcdCluster
    name: str
    size: int = 2
    flags: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # extra environment for every node
    node_flags: dict[int, dict] = field(default_factory=dict)  # flags for one node, over `flags`
    node_env: dict[int, dict] = field(default_factory=dict)  # environment for one node, over `env`
    bridge: Bridge | None = None  # when set, node i runs in a network namespace of its own on this bridge
    nodes: list[ServerProc] = field(default_factory=list)
    namespaces: list[Namespace] = field(default_factory=list)

    @staticmethod
    def node_name(i: int) -> str:
        return f"n{i}"

    @staticmethod
    def host_id(i: int) -> str:
        return f"test-host-n{i}"

    def start(self, timeout_s: float = 30) -> "ClusterProcs":
        tokens, peers = write_token_files(self.base / "auth")
        for i in range(self.size):
            self.nodes.append(self._node(i, tokens, peers))
        for node in self.nodes:
            node.start(timeout_s)
        self.wait_members(self.size)
        return self

    def _node(self, i: int, tokens: Path, peers: Path) -> ServerProc:
        flags = {
            "insecure_no_auth": False,
            "tokens_file": tokens,
            "peer_tokens_file": peers,
            "cluster_etcd": self.etcd.endpoints,
            "cluster_name": self.name,
            "node_name": self.node_name(i),
            "host_id": self.host_id(i),
            "cluster_lease_ttl_s": 2,
            "host_memory": "64MiB",
            "ssd_capacity": "256MiB",
            "ucx": False,
            "shutdown_grace_s": 1,
            **self.flags,
            **self.node_flags.get(i, {}),
        }
        env = {"KVSTORE_HOST_ID": self.host_id(i), **self.env, **self.node_env.get(i, {})}
        if self.bridge is None:
            return ServerProc(self.base / self.node_name(i), flags=flags, env=env)
        ns = self.bridge.add(self.node_name(i))
        self.namespaces.append(ns)
        env = {"UCX_NET_DEVICES": ns.leg, "UCX_TLS": "tcp,self", **env}
        return ServerProc(self.base / self.node_name(i), flags=flags, env=env, host=ns.address, wrap=ns.command([]))

    def namespace(self, i: int) -> Namespace:
        """Node i's network namespace (with a bridge only)."""
        return self.namespaces[i]

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
            node.stop(timeout_s=10)

    def __enter__(self) -> "ClusterProcs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- clients -------------------------------------------------------------------------------

    def client(self, i: int, fingerprint: Fingerprint, tenant: str = "alpha", **kw) -> KVClient:
        """A client of node i as a process on another host would be (host ids differ, so gRPC, never shm)."""
        return KVClient(self.nodes[i].address, fingerprint, token=TENANT_TOKENS[tenant], **kw)

    def _admin(self, i: int, method: str, request, timeout_s: float = 10):
        with grpc.insecure_channel(self.nodes[i].address) as channel:
            stub = apb_grpc.AdminStub(channel)
            return getattr(stub, method)(request, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=timeout_s)

    def cluster_status(self, i: int, local_only: bool = False) -> apb.ClusterResponse:
        return self._admin(i, "Cluster", apb.ClusterRequest(local_only=local_only))

    def counters(self, i: int) -> dict[str, int]:
        return dict(self._admin(i, "Stats", pb.StatsRequest()).store.counters)

    def store_stats(self, i: int) -> pb.StatsResponse:
        return self._admin(i, "Stats", pb.StatsRequest()).store

    def delete(self, i: int, selector: apb.BlockSelector, secure: bool = False, timeout_s: float = 20) -> apb.DeleteBlocksResponse:
        return self._admin(i, "DeleteBlocks", apb.DeleteBlocksRequest(selector=selector, secure=secure), timeout_s)

    def wait_members(self, n: int, timeout_s: float = 15, nodes: list[int] | None = None) -> None:
        """Until each of nodes (default: all running) sees n members, itself not fenced."""
        deadline = time.monotonic() + timeout_s
        for i in nodes if nodes is not None else range(len(self.nodes)):
            while True:
                me = self.cluster_status(i, local_only=True).nodes[0]
                if len(me.members) == n and not me.fenced:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {i} sees {len(me.members)} members (fenced: {me.fenced}), not {n}")
                time.sleep(0.05)

    def log(self, i: int) -> str:
        return self.nodes[i].log()

    def incarnations(self, i: int = 0) -> dict[str, int]:
        """Every member's incarnation as node i sees it."""
        return {m.name: m.incarnation for m in self.cluster_status(i, local_only=True).nodes[0].members}
