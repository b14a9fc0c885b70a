"""Redis as a peer in bench/peers.py: its own redis-server on a free loopback port and a Unix socket, persistence off.

Owns: starting and stopping that server and measuring it through redis-py, over TCP and over the Unix socket:
pipelined SET/GET of the working set (one pipeline per call_bytes, as kvstore batches one call), GET's values
copied into resident buffers as every other system's get fills them, and one pipeline of EXISTS for 1024 keys.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from peers_common import CONTAINS_BLOCK_BYTES, CONTAINS_KEYS, LoopShape, PeerAbsent, contains_ms, put_get_gbps

REDIS_SYSTEMS = ("redis-tcp", "redis-unix")


def redis_client_for(kind: str, port: int, socket_path: Path):
    """redis-py at its fastest for these payloads: hiredis parses replies (GET 1 MiB ~2x the pure-Python parser),
    while the pure-Python packer sends each value as its own buffer (hiredis's packer copies it: SET 1 MiB ~0.5x).
    Both classes are redis-py internals, hence the pinned version in the `bench` extra."""
    import redis
    from redis._parsers import Encoder
    from redis.connection import HIREDIS_AVAILABLE, PythonRespSerializer

    fast = {"command_packer": PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)}
    if HIREDIS_AVAILABLE:
        from redis._parsers import _HiredisParser

        fast["parser_class"] = _HiredisParser
    if kind == "redis-tcp":
        return redis.Redis(connection_pool=redis.ConnectionPool(host="127.0.0.1", port=port, **fast))
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=redis.UnixDomainSocketConnection, path=str(socket_path), **fast))


class RedisAdapter:
    """put/get/contains for one redis-py connection, in the shapes peers_common's loops call."""

    def __init__(self, client) -> None:
        self.client = client

    def put(self, keys: Sequence[str], blocks: Sequence[np.ndarray]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, block in zip(keys, blocks):
            pipe.set(key, memoryview(block))
        pipe.execute()

    def get(self, keys: Sequence[str], outs: Sequence[np.ndarray]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        for key, value, out in zip(keys, pipe.execute(), outs):
            if value is None or len(value) != out.nbytes:
                raise RuntimeError(f"redis: {key} came back {'missing' if value is None else f'as {len(value)} bytes'}")
            np.copyto(out, np.frombuffer(value, np.uint8))

    def contains(self, keys: Sequence[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [bool(n) for n in pipe.execute()]

    def remove(self, keys: Sequence[str]) -> None:
        self.client.delete(*keys)


@dataclass
class RedisPeer:
    """A private redis-server: no RDB snapshots, no AOF, no memory limit; killed on stop."""

    work_dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    adapters: dict[str, RedisAdapter] = field(default_factory=dict)

    @property
    def socket_path(self) -> Path:
        return self.work_dir / "redis.sock"

    def start(self, timeout_s: float = 15) -> "RedisPeer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise PeerAbsent("no redis-server on PATH (tools/peers_env.sh installs it)")
        try:
            import redis  # noqa: F401
        except ImportError as e:
            raise PeerAbsent(f"redis-py not importable ({e}); pip install -e '.[bench]'") from e
        from tests.serverproc import free_port

        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--unixsocket", str(self.socket_path),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.work_dir),
                "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"]
        log = open(self.work_dir / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise PeerAbsent(f"redis-server exited with {self.proc.returncode}: {(self.work_dir / 'redis.log').read_text()[-400:]}")
            try:
                self.adapters = {kind: RedisAdapter(redis_client_for(kind, self.port, self.socket_path)) for kind in REDIS_SYSTEMS}
                for adapter in self.adapters.values():
                    adapter.client.ping()
                break
            except Exception as e:  # connection refused until it listens; redis-py raises several types
                if time.monotonic() > deadline:
                    self.stop()
                    raise PeerAbsent(f"redis-server not answering in {timeout_s}s: {e}") from e
                time.sleep(0.05)
        return self

    def version(self) -> str:
        return str(next(iter(self.adapters.values())).client.info("server")["redis_version"])

    def measure_round(self, round_idx: int, sizes: Sequence[int], shape: LoopShape, contains_calls: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, adapter in self.adapters.items():
            for size in sizes:
                out |= put_get_gbps(kind, adapter.put, adapter.get, adapter.remove, size, shape, f"r{round_idx}-{kind}")
            keys = [f"c{round_idx}-{kind}-{i}" for i in range(CONTAINS_KEYS)]
            adapter.put(keys, [np.zeros(CONTAINS_BLOCK_BYTES, np.uint8)] * len(keys))
            out |= contains_ms(kind, adapter.contains, keys, contains_calls)
            adapter.remove(keys)
        return out

    def stop(self) -> None:
        for adapter in self.adapters.values():
            adapter.client.close()
        self.adapters = {}
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
