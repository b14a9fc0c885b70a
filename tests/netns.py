"""Network namespaces joined by a bridge, for cluster tests that need real partitions on one box.

Each node gets its own namespace with a veth leg on a bridge in the root namespace; the root side
(where etcd and the test run) has the bridge's address. A partition is made the way a dead link
looks from inside: a static neighbour entry with a bogus MAC drops packets in one direction silently,
so connects and calls time out instead of failing fast (this kernel has no netem, and iptables is
absent). A slow link is a tbf rate cap on a node's leg (rate_limit). Everything the harness creates is named after the test process and removed on close, even
when the test fails.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
from dataclasses import dataclass, field

BOGUS_MAC = "02:00:00:00:00:01"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def netns_available() -> str:
    """'' when namespaces can be made here, else why not (the tests skip with it)."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"kvprobe{os.getpid()}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


def need_netns() -> None:
    """For tests: skip where namespaces cannot be made, naming why; under CI (CI set), fail instead: the
    partition tests are the only proof of fencing under a real partition, and CI runs as root."""
    import pytest

    if reason := netns_available():
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI runs the partition tests as root: the set-up is broken)")
        pytest.skip(reason)


@dataclass
class Namespace:
    name: str  # the netns name
    address: str  # its IPv4 address on the bridge
    root_leg: str  # the veth end in the root namespace, on the bridge
    leg: str  # the veth end inside the namespace

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass
class Bridge:
    """A bridge at 10.<net>.0.1/24 in the root namespace and one namespace per named node."""

    net: int = field(default_factory=lambda: 20 + os.getpid() % 80)  # 10.<net>.0.0/24: two runs at once use two subnets
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    nodes: dict[str, Namespace] = field(default_factory=dict)
    _cuts: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.bridge = f"kvbr{self.tag}"
        self.root_address = f"10.{self.net}.0.1"
        atexit.register(self.close)

    def __enter__(self) -> "Bridge":
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, node: str) -> Namespace:
        i = len(self.nodes)
        ns = Namespace(name=f"kv{self.tag}-{node}", address=f"10.{self.net}.0.{10 + i}",
                       root_leg=f"kv{self.tag}r{i}", leg=f"kv{self.tag}n{i}")
        _ip("netns", "add", ns.name)
        self.nodes[node] = ns
        _ip("link", "add", ns.root_leg, "type", "veth", "peer", "name", ns.leg)
        _ip("link", "set", ns.leg, "netns", ns.name)
        _ip("link", "set", ns.root_leg, "master", self.bridge, "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", ns.leg)
        _ip("-n", ns.name, "link", "set", ns.leg, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        return ns

    def _address(self, who: str) -> str:
        return self.root_address if who == "root" else self.nodes[who].address

    def _drop(self, src: str, dst: str, on: bool) -> None:
        """Packets from src to dst vanish (src's neighbour entry for dst points nowhere)."""
        where = [] if src == "root" else ["-n", self.nodes[src].name]
        dev = self.bridge if src == "root" else self.nodes[src].leg
        if on:
            _ip(*where, "neigh", "replace", self._address(dst), "lladdr", BOGUS_MAC, "nud", "permanent", "dev", dev)
        else:
            _ip(*where, "neigh", "del", self._address(dst), "dev", dev, check=False)

    def cut(self, a: str, b: str, both_ways: bool = True) -> None:
        """Silently drop a -> b (and b -> a). 'root' names the root namespace (etcd, the test)."""
        self._drop(a, b, True)
        self._cuts.add((a, b))
        if both_ways:
            self._drop(b, a, True)
            self._cuts.add((b, a))

    def isolate(self, node: str) -> None:
        """node can reach nobody and nobody can reach it: a partition of one."""
        for other in ["root", *self.nodes]:
            if other != node:
                self.cut(node, other)

    def rate_limit(self, node: str, rate: str = "100mbit", burst: str = "64kb", latency: str = "200ms") -> None:
        """Cap what node sends (its veth leg's egress) with a token bucket filter: a slow link from node to everyone.
        (This kernel has tbf but no netem: a rate cap, not a delay.) Removed with the namespace."""
        ns = self.nodes[node]
        subprocess.run(["tc", "-n", ns.name, "qdisc", "replace", "dev", ns.leg, "root", "tbf", "rate", rate, "burst", burst,
                        "latency", latency], check=True, capture_output=True, text=True, timeout=10)

    def heal(self) -> None:
        for src, dst in list(self._cuts):
            self._drop(src, dst, False)
        self._cuts.clear()

    def close(self) -> None:
        for ns in self.nodes.values():
            _ip("link", "del", ns.root_leg, check=False)
            _ip("netns", "del", ns.name, check=False)
        self.nodes.clear()
        _ip("link", "del", self.bridge, check=False)
