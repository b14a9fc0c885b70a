"""One command for a small local deployment: a kvstore server, one prefill worker, one decode worker, one router.

    python -m engines.deploy --checkpoint ./ckpt --make-random-checkpoint tiny
    python -m engines.deploy --nodes 3 --checkpoint ./ckpt --make-random-checkpoint tiny   # a cluster (deploy_cluster.py)

Each part is its own process, started with the same command a real deployment
would use (printed as it starts), so this module owns only their order, their
ports and their shutdown: it prints the router's URL once every part answers
its health check, and on Ctrl-C or SIGTERM stops them in reverse order. If any
part dies, the rest are stopped and the command exits non-zero: a half
deployment that answers health checks but cannot serve is worse than none.
It refuses to be a cluster manager: one host, and no restarts but the one a
caller asks for (ClusterDeployment.restart_store).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engines.presets import PRESETS, ensure_random_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    args: list[str]
    ready: Callable[[], bool]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # over this process's environment
    proc: subprocess.Popen | None = None

    def launch(self) -> "Child":
        shown = " ".join(f"{k}={v}" for k, v in self.env.items() if "TOKEN" not in k)  # tokens stay out of logs
        print(f"starting {self.name}: {shown + ' ' if shown else ''}{shlex.join(self.args)}  (log: {self.log_path})", flush=True)
        with open(self.log_path, "ab") as log:
            # SIGTERM if this process dies without cleaning up (SIGKILL, say), armed by engines.orphan_guard:
            # no preexec_fn here, whose fork() would run gRPC's fork handlers in the child (see that module)
            guarded = [sys.executable, "-m", "engines.orphan_guard", str(os.getpid()), *self.args]
            self.proc = subprocess.Popen(guarded, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env} if self.env else None, start_new_session=True)
        return self

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n{self.tail()}")
            try:
                if self.ready():
                    print(f"{self.name} ready pid={self.proc.pid}", flush=True)
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready in time; see {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    return check


def grpc_ready(address: str) -> Callable[[], bool]:
    def check() -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                return False
        return status == health_pb2.HealthCheckResponse.SERVING
    return check


@dataclass
class Deployment:
    checkpoint: Path
    work_dir: Path
    host: str = "127.0.0.1"
    router_port: int = 8000
    host_memory: str = "1GiB"
    worker_args: list[str] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    @property
    def router_url(self) -> str:
        return f"http://{self.host}:{self.router_port}"

    def stages(self) -> list[list[Child]]:
        """Started in order, each stage at once: the store, then both workers (model loading dominates), then the router."""
        py, logs = sys.executable, self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        store = f"{self.host}:{free_port()}"
        prefill, decode = f"http://{self.host}:{free_port()}", f"http://{self.host}:{free_port()}"
        return [
            [Child("store", [py, "-m", "kvstore.cli", "serve", "--listen", store, "--data-dir", str(self.work_dir / "store"),
                             "--host-memory", self.host_memory, "--insecure-no-auth"],
                   grpc_ready(store), logs / "store.log")],
            [self.worker("prefill", "prefill", store, prefill), self.worker("decode", "decode", store, decode)],
            [self.router([prefill], [decode])],
        ]

    def worker(self, name: str, role: str, store: str, url: str, env: dict[str, str] | None = None) -> Child:
        args = [sys.executable, "-m", f"engines.{role}", "--store", store, "--checkpoint", str(self.checkpoint),
                "--host", self.host, "--port", url.rsplit(":", 1)[1], *self.worker_args]
        return Child(name, args, http_ready(url), self.work_dir / "logs" / f"{name}.log", env or {})

    def router(self, prefill: list[str], decode: list[str]) -> Child:
        return Child("router", [sys.executable, "-m", "engines.router", "--host", self.host, "--port", str(self.router_port),
                                "--prefill", ",".join(prefill), "--decode", ",".join(decode)],
                     http_ready(self.router_url), self.work_dir / "logs" / "router.log")

    def start(self, timeout_s: float = 120) -> "Deployment":
        deadline = time.monotonic() + timeout_s
        for stage in self.stages():
            self.children.extend(child.launch() for child in stage)
            for child in stage:
                child.wait_ready(deadline)
        return self

    def describe(self) -> list[str]:
        """What an operator needs beyond the router's URL, printed once everything is up."""
        return []

    def watch(self, poll_s: float = 0.5) -> str:
        """Block until a child dies and return its name; a signal interrupts the wait."""
        while True:
            for child in self.children:
                if not child.alive():
                    return child.name
            time.sleep(poll_s)

    def stop(self) -> None:
        for child in reversed(self.children):
            code = child.stop()
            print(f"stopped {child.name} (exit {code})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="HF Llama checkpoint directory")
    parser.add_argument("--make-random-checkpoint", choices=sorted(PRESETS), metavar="SIZE",
                        help=f"create a random checkpoint of this size ({', '.join(PRESETS)}) at --checkpoint if none is there")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="router port")
    parser.add_argument("--work-dir", type=Path, default=None, help="store data and logs (default: a temp dir)")
    parser.add_argument("--host-memory", default="1GiB", help="kvstore host tier size")
    parser.add_argument("--worker-args", default="", help="extra flags for both workers, e.g. '--dtype float32'")
    parser.add_argument("--start-timeout-s", type=float, default=300)
    parser.add_argument("--nodes", type=int, default=1,
                        help="kvstore nodes; more than 1 starts etcd and a cluster, with a prefill and a decode worker per node")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")

    if args.make_random_checkpoint:
        ensure_random_checkpoint(args.checkpoint, args.make_random_checkpoint)
    if not (args.checkpoint / "config.json").exists():
        parser.error(f"{args.checkpoint} has no config.json (pass --make-random-checkpoint tiny to create one)")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="kvstore-deploy-"))
    kind, extra = Deployment, {}
    if args.nodes > 1:
        from engines.deploy_cluster import ClusterDeployment

        kind, extra = ClusterDeployment, {"nodes": args.nodes}
    deployment = kind(args.checkpoint.resolve(), work_dir, args.host, args.port, args.host_memory,
                      shlex.split(args.worker_args), **extra)

    def on_signal(signum: int, _frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        deployment.start(args.start_timeout_s)
        for line in deployment.describe():
            print(line, flush=True)
        print(f"router: {deployment.router_url}", flush=True)
        print(f"try: curl -s {deployment.router_url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
        died = deployment.watch()
        print(f"{died} exited unexpectedly; stopping the rest", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    except (RuntimeError, TimeoutError) as err:
        print(f"deployment failed: {err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        deployment.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
