"""What does cluster mode cost and deliver? Remote reads, fully remote lookups, commit visibility, dead nodes, local hits.

    sudo python bench/cluster.py            # 3 nodes in network namespaces on a veth bridge, a few minutes
    sudo python bench/cluster.py --quick    # the same rows, fewer rounds: under 2 minutes

Real processes: one etcd (tests/etcdproc.py) and three `kvstore serve` nodes A, B, C joined through it
(tests/clusterproc.py), each in a network namespace of its own on a bridge (tests/netns.py), so node to
node traffic crosses two veth legs and the bridge; plus a plain server with cluster mode off, the anchor
for local hits. Without root or `ip netns` the nodes run on loopback with distinct host ids, and the
output says so. Every row is a median over rounds that interleave the thing and its anchor:

- remote get: a client on B's host (shm) gets 1 MiB blocks only A holds: B finds them through the
  directory, copies them from A over the network, checks and stores them, then serves them. Anchors:
  the same blocks got from A by a client on A's host (shm, the best case), a direct UCX get from A by
  a client in B's namespace (kvclient's UCX transport over the same link), and raw TCP from A's
  namespace to B's (Python sockets, the bytes alone).
- 512-key prefix lookup, fully remote: a Lookup on B of a chain only A holds (Locate at each key's
  homes); anchor: the same lookup of a chain B holds.
- commit to visible: a put on A returns, then lookups on B until B sees the whole prefix.
- dead node: node C SIGKILLed; time until neither A's nor B's Admin.Cluster lists it (target: lease TTL + 1 s).
- hot prefix: one prefix written on A, read on B, then on C, then again on both; the peer bytes each node
  served (max over mean; target 1.5, design T10). The directory names the newest, least loaded copy first, so
  C copies B's copy instead of A's; every node's repeat read must fetch nothing. Anchor: all from A (3x).
- local hits: Lookup and Pin p50 and shm get GB/s of blocks the node holds, cluster mode on vs off; and
  what a small put pays for being announced to its directory homes before it returns.
- aggregate get: three clients, one on each node's host (agent processes), each reading blocks its own node
  holds, all at once; anchor: one of them alone. The scaling ratio is their joint GB/s over the lone one's.
- rolling restart under engine load (bench/cluster_rolling.py, skipped with --no-rolling): the deployment
  `python -m engines.deploy --nodes 3` makes, each store restarted in turn while three clients send
  completions through the router: failed completions, and how soon the cross-node remote-hit ratio is
  back to 90% of what it was before; its curve is saved as bench/out/cluster_rolling_restart.png.
- replication lag (cluster_replicas = 2): a writer on A's host puts at a fixed 100 MB/s; per pushed batch,
  commit on A to the replica node's answer (it answers once its directory homes know it holds the copy),
  as A's cluster status reports it. A pair of its own on loopback, beside the three nodes.

Process layout: the clients "on a node's host" live in this process (their KVSTORE_HOST_ID is the
node's, so they map its pool and use its local socket, which namespaces do not separate); the UCX
client and the TCP ends run as agents inside B's and A's namespaces (this file with --agent).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import xxhash

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_fingerprint  # noqa: E402

MiB = 1 << 20
CLUSTER = "bench"
BLOCK_TOKENS = 16  # make_fingerprint's


def block_keys(client, start: int, count: int) -> list:
    """count keys of one chain, distinct per start (token ids start*16 ...)."""
    return client.block_keys(np.arange(start * BLOCK_TOKENS, (start + count) * BLOCK_TOKENS))


def digest(buffers) -> str:
    h = xxhash.xxh3_64()
    for b in buffers:
        h.update(memoryview(b).cast("B"))
    return h.hexdigest()


# ---- the agent: this file run inside a node's namespace ------------------------------------------

class AgentOps:
    """What an agent does on command (one JSON line in, one out): a UCX client's gets, and raw TCP ends."""

    def __init__(self) -> None:
        self.client = None
        self.outs: dict[tuple[int, int], list[np.ndarray]] = {}
        self.sock: socket.socket | None = None
        self.recv_buf = bytearray(0)

    def ucx_client(self, address: str, token: str) -> dict:
        from kvclient import KVClient

        self.client = KVClient(address, make_fingerprint(), token=token, transport="ucx")
        return {"transport": self.client.stats()["client"]["transport"]}

    def local_client(self, address: str, token: str) -> dict:
        """A client on the node's host (the agent's KVSTORE_HOST_ID is the node's): shm and the local socket."""
        from kvclient import KVClient

        self.client = KVClient(address, make_fingerprint(), token=token)
        return {"transport": self.client.stats()["client"]["transport"]}

    def get(self, start: int, count: int, block: int) -> dict:
        outs = self.outs.setdefault((count, block), [np.empty(block, np.uint8) for _ in range(count)])
        keys = block_keys(self.client, start, count)
        began = time.monotonic()  # one clock for every process: spans of concurrent agents can be joined
        t0 = time.perf_counter()
        self.client.get(keys, out=outs)
        return {"s": time.perf_counter() - t0, "digest": digest(outs), "began": began, "ended": time.monotonic()}

    def tcp_listen(self, host: str) -> dict:
        """Serve one connection: each 8-byte request n is answered with n bytes, sent a block at a time."""
        server = socket.create_server((host, 0))
        block = memoryview(np.random.default_rng(7).integers(0, 256, MiB, dtype=np.uint8).tobytes())

        def serve() -> None:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while (head := conn.recv(8, socket.MSG_WAITALL)) and len(head) == 8:
                    left = int.from_bytes(head, "little")
                    while left:
                        n = min(left, len(block))
                        conn.sendall(block[:n])
                        left -= n

        threading.Thread(target=serve, daemon=True).start()
        return {"port": server.getsockname()[1]}

    def tcp_connect(self, host: str, port: int) -> dict:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return {}

    def tcp_recv(self, nbytes: int) -> dict:
        if len(self.recv_buf) < nbytes:
            self.recv_buf = bytearray(nbytes)
        view = memoryview(self.recv_buf)
        t0 = time.perf_counter()
        self.sock.sendall(nbytes.to_bytes(8, "little"))
        got = 0
        while got < nbytes:
            n = self.sock.recv_into(view[got:min(nbytes, got + MiB)])
            if not n:
                raise ConnectionError("sender closed")
            got += n
        return {"s": time.perf_counter() - t0}


def agent_main() -> None:
    ops = AgentOps()
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = getattr(ops, command["op"])(**command["args"])
        except Exception as err:  # reported to the bench, which stops
            answer = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class Agent:
    """The bench's handle on an agent process (inside a namespace when wrap says so)."""

    def __init__(self, name: str, wrap: list[str], env: dict, log_dir: Path) -> None:
        self.name = name
        self.log = open(log_dir / f"agent-{name}.log", "ab")
        self.proc = subprocess.Popen([*wrap, sys.executable, str(Path(__file__).resolve()), "--agent"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **env})

    def __call__(self, op: str, **args) -> dict:
        self.send(op, **args)
        return self.answer(op)

    def send(self, op: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()

    def answer(self, op: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {self.name} exited (log: {self.log.name})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"agent {self.name}: {op}: {answer['error']}")
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---- the bench ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    name: str
    value: str
    anchor: str = ""
    ratio: str = ""
    verdict: str = ""  # "PASS ..." / "MISS ..." where the row has a target


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def p(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q))


def verdict(ok: bool, target: str) -> str:
    return f"{'PASS' if ok else 'MISS'} ({target})"


@contextmanager
def host(host_id: str) -> Iterator[None]:
    """Clients made inside believe they run on host_id (KVSTORE_HOST_ID): shm and the local socket only to its node."""
    old = os.environ.get("KVSTORE_HOST_ID")
    os.environ["KVSTORE_HOST_ID"] = host_id
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KVSTORE_HOST_ID", None)
        else:
            os.environ["KVSTORE_HOST_ID"] = old


def client_on(host_id: str, address: str):
    from kvclient import KVClient
    from tests.clusterproc import TENANT_TOKENS

    with host(host_id):
        client = KVClient(address, make_fingerprint(), token=TENANT_TOKENS["alpha"])
    chosen = client.stats()["client"]
    if (chosen["transport"], chosen["control"]) != ("shm", "local"):
        raise RuntimeError(f"a client on {host_id} did not get shm and the local socket: {chosen}")
    return client


def payload(n: int, size: int, seed: int) -> list[np.ndarray]:
    data = np.random.default_rng(seed).integers(0, 256, n * size, dtype=np.uint8)
    return [data[i * size:(i + 1) * size] for i in range(n)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.next_chain = 1000

    def chain(self, count: int) -> int:
        """A start for count keys no other measurement uses."""
        start = self.next_chain
        self.next_chain += count + 1000
        return start

    # ---- topology ----------------------------------------------------------------------------

    def run(self) -> None:
        from tests.clusterproc import ClusterProcs, TENANT_TOKENS
        from tests.etcdproc import EtcdCluster, ensure_etcd
        from tests.netns import Bridge, netns_available

        if reason := ensure_etcd():
            raise SystemExit(f"bench/cluster.py needs etcd: {reason}")
        base = Path(tempfile.mkdtemp(prefix="kvstore-bench-cluster-"))
        no_netns = "forced by --loopback" if self.args.loopback else netns_available()
        flags = {"host_memory": "1GiB", "ssd_capacity": "1GiB", "cluster_lease_ttl_s": self.args.ttl,
                 "remote_fetch_deadline_ms": 5000, "ucx": True,
                 "hot_threshold": 0}  # no hot pushes: the fully remote lookup looks one chain up hundreds of times
        with ExitStack() as stack:
            if no_netns:
                self.topology = f"LOOPBACK nodes with distinct host ids (network namespaces unavailable: {no_netns})"
                bridge, etcd_host, self.b_side = None, "127.0.0.1", "another host id on loopback"
                flags["ucx_all_interfaces"] = True
                env = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}
            else:
                bridge = stack.enter_context(Bridge(net=100 + os.getpid() % 150))  # not the tests' 10.77: both may run at once
                etcd_host, env, self.b_side = bridge.root_address, {}, "B's namespace"
                self.topology = "3 nodes in network namespaces on a veth bridge"
            etcd = stack.enter_context(EtcdCluster(base / "etcd", members=1, host=etcd_host))
            self.cluster = stack.enter_context(ClusterProcs(base / "nodes", etcd, CLUSTER, size=3, flags=flags, env=env,
                                                            bridge=bridge))
            a_addr = self.cluster.nodes[0].address
            if bridge is None:
                wraps, tcp_host = ([], []), "127.0.0.1"
                agent_env = [{"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}] * 2
            else:
                ns_a, ns_b = self.cluster.namespace(0), self.cluster.namespace(1)
                wraps, tcp_host = (ns_a.command([]), ns_b.command([])), ns_a.address
                agent_env = [{"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": ns.leg} for ns in (ns_a, ns_b)]
            # The agents stand for other processes on A's and B's hosts, but not for clients co-located with a node.
            self.agent_a = Agent("a", wraps[0], {**agent_env[0], "KVSTORE_HOST_ID": "bench-agent-a"}, base)
            self.agent_b = Agent("b", wraps[1], {**agent_env[1], "KVSTORE_HOST_ID": "bench-agent-b"}, base)
            stack.callback(self.agent_a.close)
            stack.callback(self.agent_b.close)
            transport = self.agent_b("ucx_client", address=a_addr, token=TENANT_TOKENS["alpha"])["transport"]
            if transport != "ucx":
                raise RuntimeError(f"the direct client in B's namespace got {transport}, not ucx")
            port = self.agent_a("tcp_listen", host=tcp_host)["port"]
            self.agent_b("tcp_connect", host=tcp_host, port=port)
            self.on_a = client_on(self.cluster.host_id(0), a_addr)
            self.on_b = client_on(self.cluster.host_id(1), self.cluster.nodes[1].address)
            stack.callback(self.on_a.close)
            stack.callback(self.on_b.close)

            self.remote_get()
            self.remote_lookup()
            self.visibility()
            self.local_hits(base)
            self.aggregate_get(base)
            self.hot_prefix()
            self.dead_node()
            self.replication_lag(base, etcd)
        if not self.args.no_rolling:
            self.rolling_restart()

    # ---- measurements --------------------------------------------------------------------------

    def remote_get(self) -> None:
        n, size = 32, MiB
        nbytes = n * size
        rounds = 5 if self.quick else 15
        outs_a, outs_b = [np.empty(size, np.uint8) for _ in range(n)], [np.empty(size, np.uint8) for _ in range(n)]
        times: dict[str, list[float]] = {k: [] for k in ("remote", "repeat", "local", "ucx", "tcp")}
        before = self.cluster.counters(1)
        for r in range(rounds + 1):  # round 0 warms every path and is not counted
            start = self.chain(n)
            data = payload(n, size, seed=r)
            keys = block_keys(self.on_a, start, n)
            self.on_a.put(keys, data)
            want = digest(data)
            t0 = time.perf_counter()
            self.on_b.get(keys, out=outs_b)  # B fetches from A, then serves it over shm
            remote = time.perf_counter() - t0
            if digest(outs_b) != want:
                raise RuntimeError("remote get returned other bytes")
            t0 = time.perf_counter()
            self.on_b.get(keys, out=outs_b)  # a local hit on B now
            repeat = time.perf_counter() - t0

            def local() -> float:
                t = time.perf_counter()
                self.on_a.get(keys, out=outs_a)
                return time.perf_counter() - t

            def ucx() -> float:
                answer = self.agent_b("get", start=start, count=n, block=size)
                if answer["digest"] != want:
                    raise RuntimeError("the direct UCX get returned other bytes")
                return answer["s"]

            others = [("local", local), ("ucx", ucx), ("tcp", lambda: self.agent_b("tcp_recv", nbytes=nbytes)["s"])]
            results = {name: call() for name, call in others[r % 3:] + others[:r % 3]}  # rotate who goes first
            if r:
                for name, seconds in {"remote": remote, "repeat": repeat, **results}.items():
                    times[name].append(seconds)
            self.on_a.delete(keys)
            self.on_b.delete(keys)
        after = self.cluster.counters(1)
        fetched, over_ucx = (after.get(k, 0) - before.get(k, 0) for k in ("remote_fetch_blocks", "remote_fetch_ucx_blocks"))
        if fetched != (rounds + 1) * n:  # B's remote tier, not something else, served every first get
            raise RuntimeError(f"B fetched {fetched} blocks from peers, expected {(rounds + 1) * n}")
        gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
        via = "B fetches over UCX" if over_ucx == fetched else f"B fetches over gRPC ({over_ucx}/{fetched} blocks over UCX)"
        self.rows += [
            Row(f"remote get 32 x 1 MiB, client on B, held by A ({via})", f"{gbps['remote']:.2f} GB/s",
                f"direct UCX get from A {gbps['ucx']:.2f} GB/s", f"{gbps['remote'] / gbps['ucx']:.2f}x",
                verdict(gbps["remote"] >= 0.5 * gbps["ucx"], ">= 0.5x direct UCX")),
            Row(f"  remote get vs raw TCP A -> {self.b_side}", "", f"raw TCP {gbps['tcp']:.2f} GB/s", f"{gbps['remote'] / gbps['tcp']:.2f}x",
                verdict(gbps["remote"] >= 0.3 * gbps["tcp"], ">= 0.3x raw TCP")),
            Row("  remote get vs local get on A (shm)", "", f"local get {gbps['local']:.2f} GB/s", f"{gbps['remote'] / gbps['local']:.2f}x"),
            Row("  repeat get on B (now a local copy, shm)", f"{gbps['repeat']:.2f} GB/s", f"local get on A {gbps['local']:.2f} GB/s",
                f"{gbps['repeat'] / gbps['local']:.2f}x", verdict(gbps["repeat"] >= 0.9 * gbps["local"], ">= 0.9x local")),
            Row(f"  direct UCX get from A, client in {self.b_side}", f"{gbps['ucx']:.2f} GB/s", f"raw TCP {gbps['tcp']:.2f} GB/s",
                f"{gbps['ucx'] / gbps['tcp']:.2f}x"),
        ]

    def remote_lookup(self) -> None:
        rounds, calls = (3, 40) if self.quick else (8, 100)
        size = 4096
        remote_chain = block_keys(self.on_a, self.chain(512), 512)
        self.on_a.put(remote_chain, payload(512, size, seed=100))
        local_chain = block_keys(self.on_b, self.chain(512), 512)
        self.on_b.put(local_chain, payload(512, size, seed=101))
        if self.on_b.lookup(remote_chain) != 512 or self.on_b.lookup(local_chain) != 512:
            raise RuntimeError("B does not see both 512-key chains")
        remote, local = [], []
        for _ in range(rounds):
            for _ in range(calls):
                for chain, out in ((remote_chain, remote), (local_chain, local)):
                    t0 = time.perf_counter()
                    self.on_b.lookup(chain)
                    out.append(time.perf_counter() - t0)
        if self.on_b.status(remote_chain[:1])[0][0].tier.name != "REMOTE":
            raise RuntimeError("the remote chain is not REMOTE on B: the lookup measured a local one")
        self.rows += [
            Row("512-key prefix lookup on B, fully remote: p50", ms(p(remote, 50)), f"local chain {ms(p(local, 50))}",
                f"{p(remote, 50) / p(local, 50):.1f}x", verdict(p(remote, 50) <= 0.003, "<= 3 ms")),
            Row("512-key prefix lookup on B, fully remote: p99", ms(p(remote, 99)), f"local chain {ms(p(local, 99))}",
                f"{p(remote, 99) / p(local, 99):.1f}x", verdict(p(remote, 99) <= 0.010, "<= 10 ms")),
        ]

    def visibility(self) -> None:
        trials = 60 if self.quick else 200
        delays, first_try, lookups = [], 0, 0
        for i in range(trials):
            keys = block_keys(self.on_a, self.chain(4), 4)
            self.on_a.put(keys, payload(4, 4096, seed=i))
            returned = time.perf_counter()
            tries = 0
            while True:
                tries += 1
                seen = self.on_b.lookup(keys) == 4
                if seen:
                    delays.append(time.perf_counter() - returned)
                    break
                if time.perf_counter() - returned > 5:
                    raise RuntimeError("a put on A was not visible on B within 5 s")
            first_try += tries == 1
            lookups += tries
        self.rows += [
            Row("commit to visible (put on A returns -> lookup on B sees it): p50", ms(p(delays, 50)),
                f"seen by B's first lookup: {first_try}/{trials}"),
            Row("commit to visible: p99", ms(p(delays, 99)), "(includes that lookup's own round trip)"),
        ]

    def local_hits(self, base: Path) -> None:
        """The same local hits on a cluster node (B) and on a plain server, interleaved by round."""
        from tests.clusterproc import write_token_files
        from tests.serverproc import ServerProc

        tokens, _ = write_token_files(base / "plain-auth")
        plain = ServerProc(base / "plain", flags={"insecure_no_auth": False, "tokens_file": tokens, "ucx": False,
                                                  "host_memory": "1GiB", "ssd_capacity": "1GiB"},
                           env={"KVSTORE_HOST_ID": "bench-plain-host"}).start()
        try:
            off = client_on("bench-plain-host", plain.address)
            try:
                self._local_hits(off)
            finally:
                off.close()
        finally:
            plain.stop()

    def _local_hits(self, off) -> None:
        """Calls alternate between the two servers one by one, so both see the same noise from the rest of the box."""
        rounds, calls = (3, 100) if self.quick else (8, 250)
        chain_start, get_start = self.chain(512), self.chain(64)
        sides = {}
        for name, client in (("on", self.on_b), ("off", off)):
            chain = block_keys(client, chain_start, 512)
            client.put(chain, payload(512, 4096, seed=200))
            blocks = block_keys(client, get_start, 64)
            client.put(blocks, payload(64, 256 << 10, seed=201))
            outs = [np.empty(256 << 10, np.uint8) for _ in range(64)]
            small = payload(4, 4096, seed=202)
            sides[name] = {"lookup": lambda c=client, k=chain: c.lookup(k),
                           "pin": lambda c=client, k=chain[:64]: c.pin(k).release(),
                           "get": lambda c=client, k=blocks, o=outs: c.get(k, out=o),
                           "put": lambda c=client, d=small: c.put(block_keys(c, self.chain(4), 4), d)}
        samples = {(side, what): [] for side in sides for what in ("lookup", "pin", "get", "put")}
        for r in range(rounds):
            for what in ("lookup", "pin", "get", "put"):
                for i in range(calls if what != "get" else calls // 5):
                    for side in ("on", "off") if (r + i) % 2 == 0 else ("off", "on"):
                        t0 = time.perf_counter()
                        sides[side][what]()
                        samples[(side, what)].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in samples.items()}
        get_gbps = {side: 64 * (256 << 10) / med[(side, "get")] / 1e9 for side in sides}
        for what, label in (("lookup", "512-key Lookup"), ("pin", "64-block Pin + release")):
            ratio = med[("on", what)] / med[("off", what)]
            self.rows.append(Row(f"local hit on B, cluster on: {label} p50", ms(med[("on", what)]), f"cluster off {ms(med[('off', what)])}",
                                 f"{ratio:.3f}x", verdict(ratio <= 1.05, "<= 1.05x off")))
        ratio = get_gbps["on"] / get_gbps["off"]
        self.rows.append(Row("local hit on B, cluster on: shm get 64 x 256 KiB", f"{get_gbps['on']:.2f} GB/s",
                             f"cluster off {get_gbps['off']:.2f} GB/s", f"{ratio:.3f}x", verdict(ratio >= 0.95, ">= 0.95x off")))
        extra = med[("on", "put")] - med[("off", "put")]
        self.rows.append(Row("put 4 x 4 KiB on B, cluster on (answered once its homes have it): p50", ms(med[("on", "put")]),
                             f"cluster off {ms(med[('off', 'put')])}", f"+{extra * 1000:.2f} ms",
                             verdict(extra <= 0.002, "announce <= +2 ms, design T7")))

    def aggregate_get(self, base: Path) -> None:
        """Aggregate get throughput of three nodes, each read by a client on its host (an agent process: no shared
        GIL) reading 32 x 1 MiB its own node holds, all at once; anchor: one of them reading alone, in the same
        rounds. Scaling = (3 clients' bytes / span from the first start to the last end) / (1 client's bytes /
        its time). On a box with fewer cores than the 3 clients and 3 servers need, it measures the box."""
        from tests.clusterproc import TENANT_TOKENS

        n, size, rounds = 32, MiB, 5 if self.quick else 15
        agents, starts = [], []
        for i in range(3):
            agent = Agent(f"local-{i}", [], {"KVSTORE_HOST_ID": self.cluster.host_id(i)}, base)
            agents.append(agent)
            transport = agent("local_client", address=self.cluster.nodes[i].address, token=TENANT_TOKENS["alpha"])["transport"]
            if transport != "shm":
                raise RuntimeError(f"the client on node {i}'s host got {transport}, not shm")
            with client_on(self.cluster.host_id(i), self.cluster.nodes[i].address) as writer:
                start = self.chain(n)
                writer.put(block_keys(writer, start, n), payload(n, size, seed=300 + i))
                starts.append(start)
        try:
            alone, together = [], []
            for r in range(rounds + 1):  # round 0 warms every path and is not counted
                solo = agents[r % 3]("get", start=starts[r % 3], count=n, block=size)
                for i, agent in enumerate(agents):
                    agent.send("get", start=starts[i], count=n, block=size)
                spans = [agent.answer("get") for agent in agents]
                if r:
                    alone.append(n * size / solo["s"])
                    together.append(3 * n * size / (max(a["ended"] for a in spans) - min(a["began"] for a in spans)))
        finally:
            for agent in agents:
                agent.close()
        one, three = statistics.median(alone) / 1e9, statistics.median(together) / 1e9
        self.notes.append("aggregate get: a round's 3 x 32 MiB over the span from the first client's start to the last "
                          "one's end (medians of rounds); ratio = that / one client reading alone (3.00x would be linear)")
        self.rows.append(Row(f"aggregate get, 3 nodes x 1 client on its host (32 x 1 MiB local to its node; {os.cpu_count()} cores)",
                             f"{three:.2f} GB/s", f"1 node, 1 client {one:.2f} GB/s", f"{three / one:.2f}x"))

    def rolling_restart(self) -> None:
        """engines.deploy --nodes 3 under engine load, each store restarted in turn (bench/cluster_rolling.py)."""
        from bench.cluster_rolling import plot, run

        result = run(self.quick)
        path = ROOT / "bench" / "out" / "cluster_rolling_restart.png"
        plot(result, path)
        self.notes.append(f"rolling restart curve: {path}")
        pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        self.rows += [
            Row("rolling restart, 3 nodes under engine load (3 clients, loopback): completions failed",
                f"{result.failed} of {result.completions}", "", "", verdict(result.failed == 0, "0 failed")),
            Row("  remote-hit ratio (cross-node P/D, decode's fetched share): after the last restart",
                "-" if result.recovered_s is None else f"back in {result.recovered_s:.0f} s",
                f"before {pct(result.baseline)}; lowest during {pct(result.lowest)}", "",
                verdict(result.recovered_s is not None and result.recovered_s <= 30, ">= 90% of before within 30 s")),
            Row("  a node away (SIGTERM until every node sees it back): worst of 3", f"{max(result.away_s):.1f} s"),
        ]

    def hot_prefix(self) -> None:
        """A prefix written on A and read by B then C (each once the last reader's copy is announced), then again by
        both: the peer bytes each node served over all rounds, max over mean (3 nodes; design T10)."""
        rounds = 3 if self.quick else 8
        n, size = 16, 256 << 10
        names = ("peer_served_bytes", "remote_fetch_bytes", "directory_batches_sent")
        on_c = client_on(self.cluster.host_id(2), self.cluster.nodes[2].address)
        try:
            before = [self.cluster.counters(i) for i in range(3)]
            repeat_fetched = 0
            for r in range(rounds):
                keys = block_keys(self.on_a, self.chain(n), n)
                data = payload(n, size, seed=300 + r)
                self.on_a.put(keys, data)
                want = digest(data)
                for i, client in ((1, self.on_b), (2, on_c)):
                    sent = self.cluster.counters(i).get("directory_batches_sent", 0)
                    if digest(client.get(keys)) != want:
                        raise RuntimeError("a hot prefix read returned other bytes")
                    deadline = time.monotonic() + 5  # the reader's copy is announced before the next reader looks
                    while self.cluster.counters(i).get("directory_batches_sent", 0) <= sent and time.monotonic() < deadline:
                        time.sleep(0.01)
                    time.sleep(0.05)
                fetched = [self.cluster.counters(i).get("remote_fetch_bytes", 0) for i in (1, 2)]
                for client in (self.on_b, on_c):
                    if digest(client.get(keys)) != want:
                        raise RuntimeError("a repeat read returned other bytes")
                repeat_fetched += sum(self.cluster.counters(i).get("remote_fetch_bytes", 0) for i in (1, 2)) - sum(fetched)
            after = [self.cluster.counters(i) for i in range(3)]
        finally:
            on_c.close()
        served = [after[i].get(names[0], 0) - before[i].get(names[0], 0) for i in range(3)]
        if sum(served) != 2 * rounds * n * size:
            raise RuntimeError(f"peers served {sum(served)} bytes, expected {2 * rounds * n * size} (two copies a round)")
        ratio = max(served) / (sum(served) / 3)
        self.rows.append(Row(f"hot prefix (A writes, B then C read, {rounds} rounds): busiest node's peer bytes / mean", f"{ratio:.2f}x",
                             "all from A: 3.00x", f"A/B/C {'/'.join(f'{s / MiB:.0f}' for s in served)} MiB",
                             verdict(ratio <= 1.5 and repeat_fetched == 0, "<= 1.5x, repeat reads local (design T10, C16)")))

    def dead_node(self) -> None:
        """SIGKILL node C; how long until no survivor's view (Admin.Cluster, each node's local answer) lists it."""
        kills = 1 if self.quick else 3
        ttl = self.args.ttl
        victim = self.cluster.nodes[2]
        name = self.cluster.node_name(2)
        gone: list[float] = []
        for k in range(kills):
            if k:
                victim.start()
                self.cluster.wait_members(3)
            victim.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            victim.proc.wait(10)
            watching = {0, 1}  # every survivor's own view (Admin.Cluster answered locally)
            while watching:
                for i in list(watching):
                    if all(m.name != name for m in self.cluster.cluster_status(i, local_only=True).nodes[0].members):
                        watching.discard(i)
                if time.monotonic() - killed > ttl + 10:
                    raise RuntimeError(f"node {name} still in the view of {sorted(watching)} {ttl + 10} s after SIGKILL")
                time.sleep(0.02)
            gone.append(time.monotonic() - killed)
        worst = max(gone)
        self.rows.append(Row(f"dead node (SIGKILL) gone from every view, lease TTL {ttl:g} s: worst of {kills}", f"{worst:.2f} s",
                             f"TTL + 1 s = {ttl + 1:g} s", f"{worst / (ttl + 1):.2f}x", verdict(worst <= ttl + 1, "<= TTL + 1 s")))

    def replication_lag(self, base: Path, etcd) -> None:
        """A pair with cluster_replicas = 2 on loopback: puts on A at a fixed rate, then A's replication lag p50/p99."""
        from tests.clusterproc import ClusterProcs

        rate, put_bytes = 100e6, 4 * MiB
        seconds = 3 if self.quick else 8
        flags = {"host_memory": "1GiB", "ssd_capacity": "2GiB", "cluster_lease_ttl_s": self.args.ttl, "ucx": True,
                 "ucx_all_interfaces": True, "cluster_replicas": 2}
        env = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}
        with ClusterProcs(base / "replicas", etcd, CLUSTER + "-replicas", size=2, flags=flags, env=env) as pair, \
                client_on(pair.host_id(0), pair.nodes[0].address) as writer:
            puts = int(seconds * rate / put_bytes)
            data = payload(4, MiB, seed=7)
            start = time.perf_counter()
            for i in range(puts):
                due = start + i * put_bytes / rate
                if (wait := due - time.perf_counter()) > 0:
                    time.sleep(wait)
                writer.put(block_keys(writer, self.chain(4), 4), data)
            achieved = puts * put_bytes / (time.perf_counter() - start)
            deadline = time.monotonic() + 30
            while pair.cluster_status(0, local_only=True).nodes[0].replication_pending and time.monotonic() < deadline:
                time.sleep(0.05)
            a = pair.cluster_status(0, local_only=True).nodes[0]
            taken = pair.counters(1).get("cluster_copies_taken", 0)
        p99 = a.replication_lag_p99_ms / 1000
        self.rows += [
            Row(f"replication lag, R = 2, writes at {rate / 1e6:.0f} MB/s (loopback pair): p50", ms(a.replication_lag_p50_ms / 1000),
                f"writes {achieved / 1e6:.0f} MB/s; replica took {taken}/{puts * 4} blocks"),
            Row("replication lag: p99", ms(p99), "commit on A -> replica announced by B", "", verdict(p99 <= 1.0, "<= 1 s, design T9")),
        ]

    # ---- output --------------------------------------------------------------------------------

    def print(self) -> None:
        print(f"kvstore cluster bench ({'quick' if self.quick else 'full'}): {self.topology}")
        headers = ("measure", "value", "anchor (same run)", "ratio", "target")
        table = [headers, *[(r.name, r.value, r.anchor, r.ratio, r.verdict) for r in self.rows]]
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        for note in self.notes:
            print(note)
        misses = [r.name.strip() for r in self.rows if r.verdict.startswith("MISS")]
        print(f"targets: {sum(r.verdict.startswith('PASS') for r in self.rows)} PASS, {len(misses)} MISS")


def main() -> None:
    if "--agent" in sys.argv:
        agent_main()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds: under 2 minutes")
    ap.add_argument("--loopback", action="store_true", help="loopback nodes even where namespaces could be made")
    ap.add_argument("--ttl", type=float, default=5.0, help="the nodes' cluster_lease_ttl_s (the server's default: 5)")
    ap.add_argument("--no-rolling", action="store_true", help="skip the rolling restart under engine load (about a minute)")
    bench = Bench(ap.parse_args())
    started = time.monotonic()
    bench.run()
    bench.print()
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
