"""A cluster member in a process of its own, for tests that SIGSTOP or SIGKILL it.

Prints one JSON line per event ({"event": "joined"|"fenced"|"applied"|"wiped"|"status", "t": monotonic, ...});
CLOCK_MONOTONIC is system-wide on Linux, so the test can compare these times with its own. Reads commands
("drain", "leave", "status") on stdin and exits when stdin closes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from kvstore.cluster.etcd import EtcdClient
from kvstore.cluster.membership import Membership, MemberSpec
from kvstore.cluster.tombstones import Tombstone, Tombstones

_out = threading.Lock()


def emit(event: str, **fields) -> None:
    with _out:
        print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--host-id", required=True)
    ap.add_argument("--ttl", type=float, default=2.0)
    ap.add_argument("--state-dir", default="", help="with tombstones: their applied revision lives here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    etcd = EtcdClient(args.etcd)
    tombstones: Tombstones | None = None
    membership: Membership | None = None

    def applied(t: Tombstone) -> None:
        emit("applied", revision=t.revision, tenant=t.tenant)

    if args.state_dir:
        tombstones = Tombstones(etcd, args.cluster, args.name, Path(args.state_dir), applied, lambda: emit("wiped"),
                                lease_id=lambda: membership.lease_id if membership else 0)
    membership = Membership(etcd, args.cluster, MemberSpec(args.name, "127.0.0.1:1", args.host_id), args.ttl,
                            before_join=tombstones.replay if tombstones else None)
    membership.on_fence(lambda: emit("fenced"))

    def joined(incarnation: int) -> None:
        if tombstones is not None:
            tombstones.ack()
        emit("joined", incarnation=incarnation)

    membership.on_join(joined)
    membership.start()
    if tombstones is not None:
        tombstones.start()
    for line in sys.stdin:
        command = line.strip()
        if command == "drain":
            membership.drain()
        elif command == "leave":
            membership.leave()
        elif command == "status":
            emit("status", **asdict(membership.status(lease_ttls=False)))
    if tombstones is not None:
        tombstones.close()
    membership.close()
    etcd.close()


class MemberProc:
    """The test side: starts main() in a subprocess and collects its events."""

    def __init__(self, etcd: str, cluster: str, name: str, host_id: str = "", ttl_s: float = 2.0, state_dir: Path | None = None,
                 wrap=lambda argv: argv) -> None:
        """wrap: turns the command line into the one to run (a network namespace's `ip netns exec ...`)."""
        argv = [sys.executable, "-m", "tests.kvstore.cluster.member_proc", "--etcd", etcd, "--cluster", cluster,
                "--name", name, "--host-id", host_id or f"host-{name}", "--ttl", str(ttl_s)]
        if state_dir is not None:
            argv += ["--state-dir", str(state_dir)]
        root = Path(__file__).resolve().parents[3]
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(wrap(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)
        self.events: list[dict] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, event: str, timeout_s: float, after: int = 0) -> dict:
        """The first `event` at index >= after; AssertionError on timeout."""
        def found() -> dict | None:
            return next((e for e in self.events[after:] if e["event"] == event), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None or self.proc.poll() is not None, timeout_s) or found() is None:
                raise AssertionError(f"no {event!r} within {timeout_s}s; saw {self.events}")
            return found()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(10)


if __name__ == "__main__":
    main()
