"""Real etcd servers for the cluster tests: 1 or 3 members on random ports, with kill/stop/pause per member.

Settings are the fast ones the design measured (docs/cluster.md): 50 ms heartbeats and a 500 ms election
timeout, so a leader lost to SIGSTOP is replaced in about a second. etcd 3.4 has no --unsafe-no-fsync, so
data dirs go on /dev/shm when it exists (a fsync there is free); they are removed on stop, and every server
this module starts is killed at exit even when a test fails.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

HEARTBEAT_MS = 50
ELECTION_MS = 500
_LIVE: set[subprocess.Popen] = set()


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def ensure_etcd() -> str:
    """'' when an etcd binary is (or could be made) available, else why not: the cluster tests skip with it."""
    if etcd_binary():
        return ""
    script = Path(__file__).resolve().parent.parent / "tools" / "ensure_etcd.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    if etcd_binary():
        return ""
    return f"no etcd server binary and tools/ensure_etcd.sh could not install one: {(done.stderr or done.stdout).strip()[-300:]}"


def etcd_version() -> tuple[int, int, int]:
    """The etcd server binary's version, (0, 0, 0) when it cannot be read."""
    binary = etcd_binary()
    if binary is None:
        return (0, 0, 0)
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)


def revokes_from_stale_leader(version: tuple[int, int, int]) -> bool:
    """Whether this etcd has etcd-io/etcd#15247: an old leader paused past a lease's TTL revokes it on resume
    (its proposal is forwarded to the new leader), though keepalives reached the new leader all along.
    Fixed by #15248 in 3.4.25 and 3.5.8; Debian's etcd-server is 3.4.23."""
    return version < (3, 4, 25) or (3, 5, 0) <= version < (3, 5, 8)


def need_etcd() -> None:
    """For tests: skip without etcd, naming why; under CI (CI set), fail instead, because `make test`
    installs etcd there and a cluster suite that skips itself would prove nothing."""
    import pytest

    if reason := ensure_etcd():
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI installs etcd through `make test`: the set-up is broken)")
        pytest.skip(reason)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@atexit.register
def _kill_all() -> None:
    for proc in list(_LIVE):
        try:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        except ProcessLookupError:
            pass


class EtcdMember:
    """One etcd server process; its ports and data dir survive stop/kill, so start() brings the same member back."""

    def __init__(self, name: str, host: str, data_dir: Path, log_path: Path, cluster: "EtcdCluster") -> None:
        self.name = name
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.data_dir = data_dir
        self.log_path = log_path
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "EtcdMember":
        assert not self.running, f"{self.name} is already running"
        argv = [
            etcd_binary() or "etcd", "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", f"http://{self.endpoint}", "--advertise-client-urls", f"http://{self.endpoint}",
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster.initial_cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster.token,
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
            "--grpc-keepalive-min-time", "1s", "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        _LIVE.add(self.proc)
        return self

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: its TCP connections stay open and silent, as a hung server's do (Mooncake#2253)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            _LIVE.discard(self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            _LIVE.discard(self.proc)

    def metric(self, name: str, timeout_s: float = 0.5) -> float | None:
        """A gauge from the member's /metrics page (None when it does not answer): no client library involved."""
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/metrics", timeout=timeout_s) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def healthy(self, timeout_s: float = 0.5) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=timeout_s) as r:
                return b'"true"' in r.read()
        except OSError:
            return False


class EtcdCluster:
    """`members` etcd servers forming one cluster on `host` (loopback by default; a bridge address for netns tests)."""

    def __init__(self, base_dir: Path, members: int = 1, host: str = "127.0.0.1") -> None:
        shm = Path("/dev/shm")
        parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(base_dir)
        self.root = Path(tempfile.mkdtemp(prefix="kvetcd-", dir=parent))
        self.log_dir = Path(base_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token = self.root.name
        self.members = [
            EtcdMember(f"m{i}", host, self.root / f"m{i}", self.log_dir / f"etcd-m{i}.log", self) for i in range(members)
        ]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        """HOST:PORT[,HOST:PORT...]: the form ServerConfig.cluster_etcd takes."""
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout_s: float = 20.0) -> "EtcdCluster":
        for m in self.members:
            if not m.running:
                m.start()
        self.wait_healthy(timeout_s)
        return self

    def wait_healthy(self, timeout_s: float = 20.0) -> None:
        """Every running member answers /health true (which, in 3.4, needs a leader)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = [m for m in self.members if m.running]
            dead = [m for m in self.members if m.proc is not None and m.proc.poll() is not None]
            if dead and not running:
                raise RuntimeError(f"etcd exited: {dead[0].log_path.read_text()[-2000:]}")
            if running and all(m.healthy() for m in running):
                return
            time.sleep(0.05)
        logs = "\n".join(m.log_path.read_text()[-1000:] for m in self.members if m.log_path.exists())
        raise TimeoutError(f"etcd not healthy after {timeout_s}s:\n{logs}")

    def leader(self) -> EtcdMember:
        for _ in range(100):
            for m in self.members:
                if m.running and m.metric("etcd_server_is_leader") == 1.0:
                    return m
            time.sleep(0.05)
        raise TimeoutError("no etcd member says it is the leader")

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
