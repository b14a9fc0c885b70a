"""Start real prefill and decode worker processes on loopback for tests and benchmarks.

Mirrors tests/serverproc.py: a process per worker, its own log file, ready once
GET /health answers. flags become CLI options (threads=1 -> --threads 1).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from engines.protocol import WorkerHealth, get_json
from tests.serverproc import ServerProc, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WorkerProc:
    role: str                      # "prefill" | "decode": the module engines.<role> runs
    store_address: str
    checkpoint_dir: Path
    flags: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    log_dir: Path | None = None
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [sys.executable, "-m", f"engines.{self.role}", "--store", self.store_address,
                "--checkpoint", str(self.checkpoint_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in self.flags.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        return args

    def start(self, timeout_s: float = 60) -> "WorkerProc":
        self.port = self.port or free_port()
        log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="kvstore-workers-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.role}-{self.port}.log"
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO_ROOT, start_new_session=True)
        self.wait_healthy(timeout_s)
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.health()
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise TimeoutError(f"{self.role} worker not healthy in {timeout_s}s:\n{self.log()}")

    def health(self) -> WorkerHealth:
        return get_json(self.url + "/health", WorkerHealth)

    # Same process handling as the store's test server: one implementation of log and stop.
    log = ServerProc.log
    stop = ServerProc.stop


def start_prefill(store_address: str, checkpoint_dir: str | Path, log_dir: Path | None = None,
                  timeout_s: float = 60, env: dict | None = None, **flags) -> WorkerProc:
    """A running `python -m engines.prefill`; flags e.g. dtype="float32", block_tokens=16, threads=1."""
    worker = WorkerProc("prefill", store_address, Path(checkpoint_dir), flags, env or {}, log_dir)
    return worker.start(timeout_s)


def start_decode(store_address: str, checkpoint_dir: str | Path, log_dir: Path | None = None,
                 timeout_s: float = 60, env: dict | None = None, **flags) -> WorkerProc:
    """A running `python -m engines.decode`; same flags as start_prefill."""
    worker = WorkerProc("decode", store_address, Path(checkpoint_dir), flags, env or {}, log_dir)
    return worker.start(timeout_s)
