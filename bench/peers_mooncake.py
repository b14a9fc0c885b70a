"""Mooncake Store as a peer in bench/peers.py, in its two layouts, each with its own mooncake_master.

embedded:   the measuring client holds the segment (global_segment_size > 0): puts and gets stay in its process.
standalone: a separate store process (Mooncake's `mooncake_client`) mounts the segment; the measuring client
            has none, so every byte crosses its transfer engine over loopback TCP, as kvstore's UCX path does.

Both use the master's built-in HTTP metadata server, and the zero-copy calls (register_buffer, batch_put_from,
batch_get_into, batch_is_exist, batch_remove), Mooncake's fastest Python path. The client runs in a worker
process (this file, `--worker`) that gets requests as JSON lines on stdin, because Mooncake's libraries link
libcuda.so.1: on a host without a GPU driver the worker and the store process get a stand-in on
LD_LIBRARY_PATH, built here from the `cu*` symbols the libraries import, each returning CUDA_ERROR_NO_DEVICE.
That path is set for Mooncake's processes only; nothing else in the run sees it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent))

from peers_common import CONTAINS_BLOCK_BYTES, CONTAINS_KEYS, LoopShape, PeerAbsent, contains_ms, put_get_gbps  # noqa: E402

LAYOUTS = ("embedded", "standalone")
CUDA_ERROR_NO_DEVICE = 100
DRIVER_SYMBOL = re.compile(r"^cu[A-Z]\w*$")  # the driver API; cuda* names are the runtime, libcudart's
READY, RESULT, ERROR = "PEERS-READY ", "PEERS-RESULT ", "PEERS-ERROR "


def mooncake_dir() -> Path:
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        raise PeerAbsent("mooncake-transfer-engine not installed (tools/peers_env.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def native_files(package_dir: Path) -> list[Path]:
    """Every ELF file Mooncake ships that a store process loads: its extension modules and binaries."""
    def is_elf(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"

    return sorted(p for p in package_dir.iterdir() if p.is_file() and is_elf(p))


def undefined_driver_symbols(files: Sequence[Path]) -> list[str]:
    names: set[str] = set()
    for path in files:
        out = subprocess.run(["nm", "-D", "--undefined-only", str(path)], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            name = line.split()[-1].split("@")[0] if line.split() else ""
            if DRIVER_SYMBOL.match(name):
                names.add(name)
    return sorted(names)


def build_cuda_stub(out_dir: Path, symbols: Sequence[str]) -> Path:
    """Compile libcuda.so.1 exporting each symbol as a function returning CUDA_ERROR_NO_DEVICE; returns out_dir.

    The loader only needs the names to resolve; callers that check the return code see 'no device', which
    Mooncake treats as a host without GPUs (the TCP transport never calls them on a store's hot path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "libcuda_stub.c"
    source.write_text("/* stand-in for the CUDA driver: every entry point reports no device */\n"
                      + "".join(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for name in symbols))
    compiler = os.environ.get("CC", "cc")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(out_dir / "libcuda.so.1"), str(source)],
                   check=True, capture_output=True)
    return out_dir


def has_cuda_driver() -> bool:
    """Asked of a fresh process: in this one a libcuda.so.1 loaded earlier (a stand-in, say) would answer by soname."""
    probe = "import ctypes, sys\ntry:\n    ctypes.CDLL('libcuda.so.1')\nexcept OSError:\n    sys.exit(1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def mooncake_env(work_dir: Path) -> dict[str, str]:
    """The environment Mooncake's processes run in: the CUDA runtime wheel's lib dir, and the stub when no driver."""
    package_dir = mooncake_dir()
    paths = []
    if not has_cuda_driver():
        try:
            paths.append(str(build_cuda_stub(work_dir / "cuda-stub", undefined_driver_symbols(native_files(package_dir)))))
        except (OSError, subprocess.CalledProcessError) as e:
            raise PeerAbsent(f"no CUDA driver and the libcuda stand-in did not build: {e}") from e
    runtime = importlib.util.find_spec("nvidia.cuda_runtime")
    if runtime is None or not runtime.submodule_search_locations:
        raise PeerAbsent("nvidia-cuda-runtime-cu12 not installed (Mooncake links libcudart.so.12)")
    paths.append(str(Path(next(iter(runtime.submodule_search_locations))) / "lib"))
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(paths + [p for p in [os.environ.get("LD_LIBRARY_PATH", "")] if p]),
           "PYTHONUNBUFFERED": "1", "GLOG_minloglevel": "2"}
    return env


# ---- the processes of one layout -------------------------------------------------------------------


def _spawn(args: list[str], env: dict, log_path: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stderr=open(log_path, "ab"), start_new_session=True, **kw)


def _wait_port(port: int, proc: subprocess.Popen, name: str, log_path: Path, timeout_s: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerAbsent(f"{name} exited with {proc.returncode}: {log_path.read_text(errors='replace')[-400:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise PeerAbsent(f"{name} not listening on {port} in {timeout_s}s")


@dataclass
class MooncakePeer:
    layout: str
    work_dir: Path
    segment_bytes: int
    procs: list[subprocess.Popen] = field(default_factory=list)
    worker: subprocess.Popen | None = None
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)

    @property
    def system(self) -> str:
        return f"mooncake-{self.layout}"

    def start(self, timeout_s: float = 60) -> "MooncakePeer":
        """Master, then (standalone) the store process, then the measuring worker; all stopped again if any fails."""
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> "MooncakePeer":
        from tests.serverproc import free_port

        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = mooncake_env(self.work_dir)
        package_dir = mooncake_dir()
        rpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        metadata = f"http://127.0.0.1:{http_port}/metadata"
        master_log = self.work_dir / "master.log"
        master = _spawn([str(package_dir / "mooncake_master"), f"--rpc_port={rpc_port}", "--rpc_address=127.0.0.1",
                         "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                         f"--http_metadata_server_port={http_port}", f"--metrics_port={metrics_port}",
                         "--enable_metric_reporting=false"], env, master_log, stdout=subprocess.DEVNULL)
        self.procs.append(master)
        _wait_port(rpc_port, master, "mooncake_master", master_log)
        _wait_port(http_port, master, "mooncake_master's metadata server", master_log)
        client_segment = self.segment_bytes
        if self.layout == "standalone":
            store_port, store_log = free_port(), self.work_dir / "store.log"
            store = _spawn([str(package_dir / "mooncake_client"), "--host=127.0.0.1", f"--port={store_port}",
                            f"--global_segment_size={self.segment_bytes >> 20}MB", f"--master_server_address=127.0.0.1:{rpc_port}",
                            f"--metadata_server={metadata}", "--protocol=tcp"], env, store_log, stdout=subprocess.DEVNULL)
            self.procs.append(store)
            _wait_port(store_port, store, "mooncake_client (the standalone store)", store_log)
            client_segment = 0
        request = {"layout": self.layout, "metadata": metadata, "master": f"127.0.0.1:{rpc_port}", "segment_bytes": client_segment}
        worker_log = self.work_dir / "worker.log"
        self.worker = _spawn([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(request)], env, worker_log,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read_lines, daemon=True).start()
        self._reply(timeout_s, READY)
        return self

    def _read_lines(self) -> None:
        assert self.worker is not None and self.worker.stdout is not None
        for line in self.worker.stdout:
            if line.startswith((READY, RESULT, ERROR)):
                self.lines.put(line)
        self.lines.put(ERROR + json.dumps(f"worker exited ({(self.work_dir / 'worker.log').read_text(errors='replace')[-400:]})"))

    def _reply(self, timeout_s: float, want: str) -> dict:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise PeerAbsent(f"{self.system} worker silent for {timeout_s}s") from None
        if line.startswith(ERROR):
            raise PeerAbsent(f"{self.system}: {json.loads(line[len(ERROR):])}")
        assert line.startswith(want), line
        return json.loads(line[len(want):])

    def measure_round(self, round_idx: int, sizes: Sequence[int], shape: LoopShape, contains_calls: int, timeout_s: float = 300) -> dict[str, float]:
        assert self.worker is not None and self.worker.stdin is not None
        self.worker.stdin.write(json.dumps({"round": round_idx, "sizes": list(sizes), "shape": shape.as_args(), "contains_calls": contains_calls}) + "\n")
        self.worker.stdin.flush()
        return self._reply(timeout_s, RESULT)

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.stdin.close()
            try:
                self.worker.wait(20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait(5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs = []


# ---- the worker: a Mooncake client measuring on request ------------------------------------------------


class MooncakeAdapter:
    """put/get/contains through the zero-copy calls, in the shapes peers_common's loops call."""

    def __init__(self, store) -> None:
        self.store = store

    def register(self, regions) -> Callable[[], None]:
        for region in regions:
            if self.store.register_buffer(region.ctypes.data, region.nbytes) != 0:
                raise RuntimeError("register_buffer failed")
        return lambda: [self.store.unregister_buffer(r.ctypes.data) for r in regions]

    def put(self, keys, blocks) -> None:
        codes = self.store.batch_put_from(list(keys), [b.ctypes.data for b in blocks], [b.nbytes for b in blocks])
        if any(c != 0 for c in codes):
            raise RuntimeError(f"batch_put_from: {sorted(set(codes))}")

    def get(self, keys, outs) -> None:
        got = self.store.batch_get_into(list(keys), [o.ctypes.data for o in outs], [o.nbytes for o in outs])
        if any(n != o.nbytes for n, o in zip(got, outs)):
            raise RuntimeError(f"batch_get_into: {sorted(set(got))}")

    def contains(self, keys) -> list[bool]:
        return [r == 1 for r in self.store.batch_is_exist(list(keys))]

    def remove(self, keys) -> None:
        self.store.batch_remove(list(keys), True)


def worker_main(request: dict) -> int:
    import numpy as np

    def say(tag: str, payload) -> None:
        sys.stdout.write(tag + json.dumps(payload) + "\n")
        sys.stdout.flush()

    try:
        from mooncake.store import MooncakeDistributedStore

        store = MooncakeDistributedStore()
        rc = store.setup("127.0.0.1", request["metadata"], request["segment_bytes"], 64 << 20, "tcp", "", request["master"])
        if rc != 0:
            raise RuntimeError(f"setup returned {rc}")
    except Exception as e:  # an absent peer, reported, never a crash of the bench
        say(ERROR, f"setup failed: {type(e).__name__}: {e}")
        return 1
    adapter = MooncakeAdapter(store)
    system = f"mooncake-{request['layout']}"
    say(READY, {})
    for line in sys.stdin:
        ask = json.loads(line)
        try:
            shape = LoopShape(**ask["shape"])
            out: dict[str, float] = {}
            for size in ask["sizes"]:
                out |= put_get_gbps(system, adapter.put, adapter.get, adapter.remove, size, shape, f"r{ask['round']}", adapter.register)
            keys = [f"c{ask['round']}-{i}" for i in range(CONTAINS_KEYS)]
            small = np.zeros(len(keys) * CONTAINS_BLOCK_BYTES, np.uint8)
            undo = adapter.register([small])
            adapter.put(keys, [small[i * CONTAINS_BLOCK_BYTES : (i + 1) * CONTAINS_BLOCK_BYTES] for i in range(len(keys))])
            out |= contains_ms(system, adapter.contains, keys, ask["contains_calls"])
            adapter.remove(keys)
            undo()
            say(RESULT, out)
        except Exception as e:
            say(ERROR, f"{type(e).__name__}: {e}")
            return 1
    store.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(json.loads(sys.argv[2])))
    sys.exit("usage: peers_mooncake.py --worker REQUEST_JSON (started by bench/peers.py)")
