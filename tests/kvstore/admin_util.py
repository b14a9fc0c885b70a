"""Helpers for the operations tests: a tokens file, `kvstore-admin` as a subprocess, raw pins."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.serverproc import ServerProc

ADMIN_TOKEN = "admin-secret"
TOKENS = {"alice-secret": ("alice", False), "bob-secret": ("bob", False), ADMIN_TOKEN: ("ops", True)}


def write_tokens(directory: Path) -> Path:
    path = directory / "tokens.toml"
    path.write_text("".join(f'[[tokens]]\ntoken = "{t}"\ntenant = "{tenant}"\nadmin = {str(admin).lower()}\n' for t, (tenant, admin) in TOKENS.items()))
    return path


def auth_flags(directory: Path, **flags) -> dict:
    return {"tokens_file": write_tokens(directory), "insecure_no_auth": False, **flags}


def run_admin(server: ServerProc, *args: str, token: str | None = ADMIN_TOKEN, timeout_s: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvstore.admin", "--server", server.address, *(["--token", token] if token else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def admin_json(server: ServerProc, *args: str, token: str | None = ADMIN_TOKEN) -> dict:
    proc = run_admin(server, "--json", *args, token=token)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def patterned_blocks(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def kv_stub(server: ServerProc) -> tuple[grpc.Channel, pb_grpc.KVStoreStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.KVStoreStub(channel)


def pin(server: ServerProc, fingerprint_id: bytes, keys: list[bytes], ttl_ms: int = 30_000, metadata=()) -> pb.PinResponse:
    channel, stub = kv_stub(server)
    with channel:
        return stub.Pin(pb.PinRequest(fingerprint_id=fingerprint_id, keys=keys, ttl_ms=ttl_ms), metadata=(("kvstore-client-id", "pinner"), *metadata))


def unpin(server: ServerProc, pin_ids: list[int], metadata=()) -> None:
    channel, stub = kv_stub(server)
    with channel:
        stub.Unpin(pb.UnpinRequest(pin_ids=pin_ids), metadata=(("kvstore-client-id", "pinner"), *metadata))


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """A server's /metrics as {(sample name, labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}
