"""The cluster flavour of engines.deploy: etcd, N kvstore nodes in cluster mode, a prefill and a decode worker per node, one router.

    python -m engines.deploy --nodes 3 --checkpoint ./ckpt --make-random-checkpoint tiny

Every node acts as a host of its own (its own host_id, so a worker maps only its own node's pool
and uses only its own node's local socket; a block another node holds reaches it through its node's
remote tier), with its own data dir, config file, tokens file and peer tokens file, all under the
work dir's nodes/<name>/. The router knows every worker; it does not know nodes. All on loopback
ports picked at start; nodes call each other over gRPC (UCX stays off: on loopback it would have to
listen on every interface).

It owns the order (etcd, then every node until each sees all members, then the workers, then the
router), the files each node reads, and one operation beyond start and stop: restart_store(i),
which a rolling restart calls node by node. It refuses to be a cluster manager: nothing restarts
on its own, and a part that dies stops the whole deployment (engines.deploy's watch).
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engines.deploy import Child, Deployment, free_port, grpc_ready, http_ready

CLUSTER_NAME = "deploy"
TENANT = "deploy"


def etcd_binary() -> str:
    binary = shutil.which("etcd")
    if binary is None:
        raise RuntimeError("no `etcd` on PATH: run tools/ensure_etcd.sh (Debian/Ubuntu: apt-get install etcd-server), "
                           "or install etcd >= 3.4")
    return binary


def scrape(metrics_url: str, token: str) -> dict[str, float]:
    """The unlabelled samples of a node's /metrics page (an admin token opens it)."""
    request = urllib.request.Request(metrics_url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=2) as response:
        text = response.read().decode()
    return {name: float(value) for name, value in re.findall(r"^(\w+) (\S+)$", text, re.M)}


def _toml(settings: dict[str, object]) -> str:
    """Flat TOML: strings as JSON strings (valid TOML basic strings), numbers and booleans as they are."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v) if isinstance(v, (int, float)) else json.dumps(str(v))
    return "".join(f"{k} = {value(v)}\n" for k, v in settings.items())


def _private(path: Path, text: str) -> Path:
    """A file only this user can read: it holds tokens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)
    return path


@dataclass(frozen=True)
class Node:
    """One kvstore node's names and addresses, fixed for the deployment's life (a restart reuses them)."""

    name: str
    host_id: str
    address: str      # gRPC, also what peers dial
    metrics_url: str
    directory: Path   # config, tokens, data


@dataclass
class ClusterDeployment(Deployment):
    nodes: int = 3
    lease_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        self.tenant_token = secrets.token_urlsafe(24)
        self.admin_token = secrets.token_urlsafe(24)
        self.peer_token = secrets.token_urlsafe(24)
        self.members: list[Node] = []
        self.stores: list[Child] = []
        self.prefill_urls: list[str] = []
        self.decode_urls: list[str] = []
        self.etcd_endpoint = ""

    # ---- the plan ----------------------------------------------------------------------------

    def stages(self) -> list[list[Child]]:
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        etcd = self._etcd(logs)
        self.members = [self._node(i) for i in range(self.nodes)]
        self.stores = [Child(f"store_{n.name}", [sys.executable, "-m", "kvstore.cli", "serve", "--config", str(n.directory / "kvstore.toml")],
                             self.member_ready(n), logs / f"store_{n.name}.log", {"KVSTORE_HOST_ID": n.host_id})
                       for n in self.members]
        workers = []
        for n in self.members:
            env = {"KVSTORE_HOST_ID": n.host_id, "KVSTORE_TOKEN": self.tenant_token}
            prefill, decode = f"http://{self.host}:{free_port()}", f"http://{self.host}:{free_port()}"
            workers += [self.worker(f"prefill_{n.name}", "prefill", n.address, prefill, env),
                        self.worker(f"decode_{n.name}", "decode", n.address, decode, env)]
            self.prefill_urls.append(prefill)
            self.decode_urls.append(decode)
        return [[etcd], self.stores, workers, [self.router(self.prefill_urls, self.decode_urls)]]

    def _etcd(self, logs: Path) -> Child:
        """One etcd member on loopback. Its data dir is made anew each start: its ports are new, and a member's
        stored peer URL must match them. Nodes notice the new etcd cluster id and drop what their SSD tier
        holds (docs/cluster.md, tombstones): they cannot know which deletes they missed."""
        data = self.work_dir / "etcd"
        shutil.rmtree(data, ignore_errors=True)
        client, peer = f"http://{self.host}:{free_port()}", f"http://{self.host}:{free_port()}"
        self.etcd_endpoint = client.removeprefix("http://")
        args = [etcd_binary(), "--name", "deploy", "--data-dir", str(data),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"deploy={peer}", "--initial-cluster-state", "new",
                "--initial-cluster-token", f"kvstore-deploy-{secrets.token_hex(4)}", "--log-level", "warn"]
        return Child("etcd", args, http_ready(client), logs / "etcd.log")

    def _node(self, i: int) -> Node:
        name = f"n{i}"
        node = Node(name, f"deploy-host-{name}", f"{self.host}:{free_port()}", f"http://{self.host}:{free_port()}/metrics",
                    self.work_dir / "nodes" / name)
        tokens = _private(node.directory / "tokens.toml",
                          f'[[tokens]]\ntoken = "{self.tenant_token}"\ntenant = "{TENANT}"\n\n'
                          f'[[tokens]]\ntoken = "{self.admin_token}"\ntenant = "ops"\nadmin = true\n')
        peers = _private(node.directory / "peers.toml", f'[[peers]]\ntoken = "{self.peer_token}"\n')
        (node.directory / "kvstore.toml").write_text(_toml({
            "listen": node.address, "advertise": node.address, "data_dir": str(node.directory / "data"),
            "host_memory": self.host_memory, "tokens_file": str(tokens), "peer_tokens_file": str(peers),
            "metrics_port": int(node.metrics_url.rsplit(":", 1)[1].split("/")[0]),
            "cluster_etcd": self.etcd_endpoint, "cluster_name": CLUSTER_NAME, "node_name": name, "host_id": node.host_id,
            "cluster_lease_ttl_s": self.lease_ttl_s,
        }))
        return node

    def describe(self) -> list[str]:
        lines = [f"etcd: {self.etcd_endpoint}"]
        lines += [f"node {n.name}: {n.address} host_id={n.host_id} metrics={n.metrics_url} config={n.directory / 'kvstore.toml'}"
                  for n in self.members]
        lines.append(f"tokens (tenant {TENANT!r}, admin): {self.members[0].directory / 'tokens.toml'}; e.g. "
                     f"kvstore-admin --server {self.members[0].address} --token <admin token> cluster")
        return lines

    # ---- readiness and the one operation -------------------------------------------------------

    def member_ready(self, node: Node) -> Callable[[], bool]:
        """Serving, a member (not fenced), and seeing all the deployment's nodes."""
        serving = grpc_ready(node.address)

        def check() -> bool:
            gauges = self.gauges(node)
            return (gauges.get("kvstore_cluster_fenced") == 0 and gauges.get("kvstore_cluster_incarnation", 0) > 0
                    and gauges.get("kvstore_cluster_members") == self.nodes and serving())
        return check

    def gauges(self, node: Node) -> dict[str, float]:
        return scrape(node.metrics_url, self.admin_token)

    def restart_store(self, i: int, timeout_s: float = 60) -> float:
        """SIGTERM node i's store (it leaves the cluster and flushes its host tier), start it again with the
        same config (name, host id, data dir), and wait until every node sees it a member again.
        Returns the seconds it was away. Its workers meanwhile compute what they would have loaded."""
        store, node = self.stores[i], self.members[i]
        started = time.monotonic()
        store.stop()
        store.launch()
        deadline = started + timeout_s
        store.wait_ready(deadline)
        for other in self.members:
            while self.gauges(other).get("kvstore_cluster_members") != self.nodes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{other.name} does not see {node.name} back within {timeout_s} s")
                time.sleep(0.1)
        return time.monotonic() - started

