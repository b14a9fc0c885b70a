"""How long does the control path hold a same-host engine before its first token? Block keys for an 8k-token
prompt and a 512-key prefix Pin over the local socket, compiled (kvwire._native, kvstore._native) against pure
Python (KVSTORE_NATIVE=0), each beside an anchor measured in the same run.

Keys: block_keys of 8192 tokens (512 blocks of 16), given as a list of ints (as the engines pass a prompt) and
as an int64 array; the compiled chain against the reference (block_keys_reference), alternating batches. The
anchor is one xxh3-128 over the same 64 KiB of token bytes: hashing them once, with no chain and no key objects.

Pin: one server per side (tests/serverproc.py) holding 512 blocks of 4 KiB, one client process each over the
local socket; a call is client.pin(keys, prefix=True) then release(), the next Pin carrying the unpin, as an
engine's stream of prefix loads does. Native: both processes compiled; Python: both with KVSTORE_NATIVE=0.
The anchor is a raw Unix-socket round trip of the same bytes between two Python processes (the Pin's request
frame out, a response frame of its size back, read with local_wire.read_frame as both ends do): what any
Python client and server pay before doing anything. Rounds alternate between the three, so a busy machine
skews them alike. Targets (issue 13): keys for 8k tokens <= 0.1 ms; the 512-key prefix Pin <= 0.3 ms.

    python bench/control_path.py            # ~1 minute on 2 cores
    python bench/control_path.py --quick    # fewer rounds
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.serverproc import ServerProc  # noqa: E402

TOKENS = 8192
PIN_KEYS = 512
BLOCK_BYTES = 4096
KEYS_TARGET_MS = 0.1
PIN_TARGET_MS = 0.3
NATIVE_ENV = "KVSTORE_NATIVE"  # kvwire/native.py


def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    ms = np.array(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


# ---- block keys ------------------------------------------------------------------------


def keys_table(calls: int) -> dict[str, dict[str, float]]:
    """p50 ms per block_keys call, by input and implementation, in alternating batches."""
    import xxhash

    from kvwire import native
    from kvwire.keys import block_keys, block_keys_reference
    from tests.conftest import make_fingerprint

    if native.native is None:
        raise SystemExit(f"kvwire._native is not in use ({native.status}): build it first (pip install -e . or make install)")
    fingerprint = make_fingerprint()
    prompt = list(np.random.default_rng(0).integers(0, 128_000, TOKENS))
    prompt = [int(t) for t in prompt]
    inputs = {"list[int]": prompt, "int64 array": np.array(prompt, dtype=np.int64)}
    raw = np.array(prompt, dtype="<i8").tobytes()
    runs = {"native": block_keys, "python": block_keys_reference,
            "anchor": lambda fp, tokens, tenant: xxhash.xxh3_128_digest(raw)}
    assert block_keys(fingerprint, prompt, "bench") == block_keys_reference(fingerprint, prompt, "bench")
    samples: dict[tuple[str, str], list[float]] = {}
    batch = 50
    for _ in range(max(1, calls // batch)):
        for input_name, tokens in inputs.items():
            for run_name, run in runs.items():
                for _ in range(batch):
                    t0 = time.perf_counter()
                    run(fingerprint, tokens, "bench")
                    samples.setdefault((input_name, run_name), []).append(time.perf_counter() - t0)
    table: dict[str, dict[str, float]] = {}
    for (input_name, run_name), values in samples.items():
        table.setdefault(input_name, {})[run_name] = percentiles_ms(values[batch:])[0]  # the first batch warms up
    return table


# ---- workers: a Pin client, and the raw-socket anchor's two ends --------------------------


def pin_worker(conn, address: str) -> None:
    """A client process over the local socket; answers ("run", n) with n Pin+release latencies."""
    from kvclient import KVClient
    from kvwire import native
    from tests.conftest import make_fingerprint

    with KVClient(address, make_fingerprint(), tenant="bench-pin", transport="shm", local_control=True) as client:
        choice = client.stats()["client"]
        if choice["control"] != "local":
            raise SystemExit(f"asked for the local control socket, got {choice}")
        keys = client.block_keys(list(range(PIN_KEYS * 16)))
        client.put(keys, [np.full(BLOCK_BYTES, i % 251, np.uint8) for i in range(len(keys))])
        with client.pin(keys, prefix=True) as pinned:
            if len(pinned) != PIN_KEYS:
                raise SystemExit(f"pinned {len(pinned)} of {PIN_KEYS}")
        conn.send(native.status)
        while (command := conn.recv()) is not None:
            samples = []
            for _ in range(command):
                t0 = time.perf_counter()
                client.pin(keys, prefix=True).release()  # released with the next Pin
                samples.append(time.perf_counter() - t0)
            conn.send(samples)
        client.delete(keys)


def sample_frames() -> tuple[bytes, bytes]:
    """A 512-key prefix Pin's request frame and a response frame of its size (the anchor's bytes)."""
    import grpc

    from kvwire import pin_codec
    from kvwire.local_wire import encode_request, encode_response

    rng = np.random.default_rng(1)
    keys = [rng.bytes(16) for _ in range(PIN_KEYS)]
    metadata = (("kvstore-client-id", f"{socket.gethostname()}:{os.getpid()}:0123abcd"), ("kvstore-tenant", "bench-pin"))
    request = encode_request("/kvstore.v1.KVStore/Pin", 30.0, metadata, pin_codec.encode_request(rng.bytes(16), keys, 0, [2**61 + 5], True))
    offsets = [i * BLOCK_BYTES * 2 for i in range(PIN_KEYS)]
    checksums = [int(c) for c in rng.integers(0, 2**64 - 1, PIN_KEYS, dtype=np.uint64, endpoint=True)]
    payload = pin_codec.encode_response(2**61 + 7, int(time.time() * 1000), offsets, [BLOCK_BYTES] * PIN_KEYS, checksums)
    return request, encode_response(grpc.StatusCode.OK, "", (), payload)


def echo_server(path: str, ready) -> None:
    """The anchor's server end: reads a frame, answers the response frame, as the local control server does (one thread)."""
    from kvwire.local_wire import read_frame

    _, response = sample_frames()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        ready.set()
        conn, _ = listener.accept()
        with conn:
            while read_frame(conn) is not None:
                conn.sendall(response)


def anchor_worker(conn, path: str) -> None:
    from kvwire.local_wire import read_frame

    request, response = sample_frames()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        conn.send("raw socket")
        while (command := conn.recv()) is not None:
            samples = []
            for _ in range(command):
                t0 = time.perf_counter()
                sock.sendall(request)
                body = read_frame(sock)
                samples.append(time.perf_counter() - t0)
                assert len(body) == len(response) - 4
            conn.send(samples)


def start(ctx, target, *args, env: dict[str, str] | None = None):
    """A worker process and our end of its pipe; env holds only while it starts (a spawned child reads it then)."""
    ours, theirs = ctx.Pipe()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not ours.poll(120):
        raise SystemExit(f"{target.__name__} did not start")
    return proc, ours, ours.recv()


def pin_table(rounds: int, calls: int, tmp: Path) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    ctx = mp.get_context("spawn")
    flags = {"host_memory": "64MiB", "ssd_capacity": "256MiB", "persist_on_shutdown": False}
    servers = {"native": ServerProc(tmp / "native", flags=flags),
               "python": ServerProc(tmp / "python", flags=flags, env={NATIVE_ENV: "0"})}
    path = str(tmp / "anchor.sock")
    ready = ctx.Event()
    echo = ctx.Process(target=echo_server, args=(path, ready), daemon=True)
    echo.start()
    workers = {}
    try:
        for srv in servers.values():
            srv.start()
        if not ready.wait(60):
            raise SystemExit("the anchor's echo server did not start")
        workers["anchor"] = start(ctx, anchor_worker, path)
        workers["native"] = start(ctx, pin_worker, servers["native"].address)
        workers["python"] = start(ctx, pin_worker, servers["python"].address, env={NATIVE_ENV: "0"})
        samples: dict[str, list[float]] = {name: [] for name in workers}
        for r in range(rounds + 1):
            for name, (_, pipe, _) in workers.items():
                pipe.send(calls)
                got = pipe.recv()
                if r:  # round 0 warms caches, connections and the servers' first pins
                    samples[name] += got
        for _, pipe, _ in workers.values():
            pipe.send(None)
        for proc, _, _ in workers.values():
            proc.join(60)
    finally:
        for srv in servers.values():
            srv.stop()
        echo.kill()
    return {name: percentiles_ms(values) for name, values in samples.items()}, {name: w[2] for name, w in workers.items()}


# ---- report -------------------------------------------------------------------------------


def verdict(value_ms: float, target_ms: float) -> str:
    return f"target <= {target_ms:g} ms: {'met' if value_ms <= target_ms else 'NOT met'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="Pin rounds per side (default 10, quick 3)")
    parser.add_argument("--calls", type=int, default=200, help="Pin calls per side per round")
    opts = parser.parse_args(argv)
    rounds = opts.rounds or (3 if opts.quick else 10)

    keys = keys_table(500 if opts.quick else 2000)
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-") as tmp:
        pins, statuses = pin_table(rounds, opts.calls, Path(tmp))

    print(f"\nblock keys, {TOKENS} tokens ({TOKENS // 16} blocks of 16), p50 ms per call:")
    print(f"  {'input':<12} {'native':>8} {'python':>8} {'speedup':>8} {'anchor':>8} {'native/anchor':>14}   anchor: one xxh3-128 over the same bytes")
    for input_name, row in keys.items():
        print(f"  {input_name:<12} {row['native']:8.4f} {row['python']:8.4f} {row['python'] / row['native']:7.1f}x "
              f"{row['anchor']:8.4f} {row['native'] / row['anchor']:14.1f}")
    print(f"  native, list[int]: {verdict(keys['list[int]']['native'], KEYS_TARGET_MS)}")

    print(f"\nprefix Pin of {PIN_KEYS} keys + deferred unpin over the local socket, ms per call ({rounds} rounds x {opts.calls} calls, alternating):")
    labels = {"anchor": "raw Unix-socket round trip, same bytes (anchor)", "native": "native client and server",
              "python": f"pure Python client and server ({NATIVE_ENV}=0)"}
    anchor_p50 = pins["anchor"][0]
    print(f"  {'':<50} {'p50':>7} {'p99':>7} {'p50/anchor':>11}")
    for name, label in labels.items():
        p50, p99 = pins[name]
        print(f"  {label:<50} {p50:7.3f} {p99:7.3f} {p50 / anchor_p50:11.1f}")
    print(f"  python / native p50: {pins['python'][0] / pins['native'][0]:.1f}x; native p50: {verdict(pins['native'][0], PIN_TARGET_MS)}")
    print(f"  client processes: native {statuses['native']}, python {statuses['python']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
