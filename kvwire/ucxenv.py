"""The one place that imports ucxx: the project's UCX environment defaults, the server's context, the client's worker.

UCX reads its configuration from the environment once, when the library loads, so
the defaults must be in os.environ before `import ucxx`. They are defaults only
(os.environ.setdefault): an operator's UCX_TLS or UCX_NET_DEVICES always wins.

- UCX_TLS=tcp,self,sm and UCX_NET_DEVICES=lo: works on any machine, loopback CI
  included. On an RDMA/GPU fabric set e.g. UCX_TLS=rc,cuda_copy,cuda_ipc and
  UCX_NET_DEVICES=mlx5_0:1 (or unset both to let UCX pick).
- UCX_TCP_TX_SEG_SIZE/UCX_TCP_RX_SEG_SIZE=512k: UCX's 8 KiB default segments cost
  a wake-up per 8 KiB on TCP; 512 KiB tripled loopback throughput on a 2-core CI box.
- UCX_WARN_UNUSED_ENV_VARS=n: ucxx sets UCX_MEMTYPE_CACHE, which some UCX builds
  no longer know; the warning is noise.

The server (start_context) serves many connections at once on an asyncio loop, with
ucxx's progress thread and completions as Python futures: a request's completion
resolves an asyncio future (ucxx's notifier thread) instead of every awaiting
coroutine polling with asyncio.sleep(0), ucxx's default. Polling kept each UCX loop
at 100% of a core per process with requests in flight; with four clients and a
server on two cores, the polling loops starved the threads that actually move the
bytes, and calls stalled for seconds (long enough for write leases to expire).

A client makes one request at a time and its caller waits for it anyway, so it needs
none of that machinery: `Worker` is progressed by the calling thread itself, which
sleeps in epoll on the worker's event fd when nothing moves (blocking progress). No
progress thread, notifier thread or event loop, so no thread hand-off and no asyncio
task per message: on a 2-core box those hops, not the bytes, were what made a 1 MiB
get reach only ~0.6 of raw loopback TCP.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from types import ModuleType
from typing import Any, Iterator, Sequence

UCX_DEFAULTS = {
    "UCX_TLS": "tcp,self,sm",
    "UCX_NET_DEVICES": "lo",
    "UCX_TCP_TX_SEG_SIZE": "512k",
    "UCX_TCP_RX_SEG_SIZE": "512k",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}

_import_error: str | None = None


def import_ucxx() -> ModuleType | None:
    """ucxx with the project's defaults applied, or None (see unavailable_reason) when it cannot load."""
    global _import_error
    for name, value in UCX_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        import ucxx
    except Exception as err:  # ImportError, or a missing libucx shared object
        _import_error = f"{type(err).__name__}: {err}"
        return None
    return ucxx


def start_context(ucxx: ModuleType) -> None:
    """Create ucxx's process-wide context; call it on the thread running the asyncio loop that awaits UCX requests.

    ucxx binds its notifier thread to that loop, and the thread inherits the caller's
    daemon flag, so a daemon loop thread never holds up interpreter exit.
    """
    from ucxx import core

    if core._ctx is None:  # someone else in this process may have started it already
        ucxx.init(progress_mode="thread", enable_python_future=True)


def unavailable_reason() -> str:
    return _import_error or "ucxx is importable"


class Worker:
    """The client process's UCX worker, progressed by whichever thread holds `lock` and waits on it.

    One request at a time per process: the holder posts its messages and progresses
    the worker until they completed. Nothing progresses the worker between calls,
    so an idle client costs no CPU; what arrives meanwhile waits in the kernel.
    """

    _instance: "Worker | None" = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        from ucxx._lib import libucxx

        self.lib = libucxx
        context = libucxx.UCXContext({})
        # Whether UCX here moves GPU memory: a CUDA build with a CUDA transport in UCX_TLS. Without one it would take
        # a GPU address for host memory (the kernel refuses the socket I/O, or worse), so GPU buffers must not reach it.
        self.cuda_support = bool(context.cuda_support)
        self.worker = libucxx.UCXWorker(context, enable_delayed_submission=False, enable_python_future=False)
        self.worker.init_blocking_progress_mode()
        self.lock = threading.Lock()
        self.pid = os.getpid()

    @classmethod
    def get(cls) -> "Worker":
        """This process's worker. UCX does not survive fork: a child forked after its parent made one
        is refused at once (the transport then falls back) instead of timing out on a dead connection."""
        with cls._guard:
            if cls._instance is not None and cls._instance.pid != os.getpid():
                raise RuntimeError("UCX was initialised before this process was forked; start workers with 'spawn'")
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def completions(self, requests: Sequence[Any], deadline: float) -> Iterator[int]:
        """Indices of requests as they complete (a failed one raises); between them, progress or sleep in epoll."""
        pending = list(range(len(requests)))
        while pending:
            self.worker.progress()
            still = []
            for i in pending:
                if requests[i].completed:
                    requests[i].check_error()
                    yield i
                else:
                    still.append(i)
            pending = still
            if pending:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise TimeoutError(f"{len(pending)} UCX messages still in flight")
                self.worker.progress_worker_event(min(int(left_s * 1000) + 1, 1000))

    def wait(self, requests: Sequence[Any], deadline: float) -> None:
        for _ in self.completions(requests, deadline):
            pass


class Endpoint:
    """A connection to a ucxx listener, sending and receiving on the tags ucxx's own handshake agrees on.

    ucxx's async create_endpoint swaps (tag, hash64bits(tag)) over UCX streams, the
    listener sending first, and derives a user tag t as hash64bits(tag, hash(t)); this
    does the same, so the server keeps its ucxx listener. Call with the worker's lock held.
    """

    def __init__(self, worker: Worker, host: str, port: int, deadline: float) -> None:
        from ucxx._lib.arr import Array
        from ucxx._lib_async.utils import hash64bits
        from ucxx.types import Tag, TagMaskFull

        self.worker, self._array, self._hash, self._tag, self._mask = worker, Array, hash64bits, Tag, TagMaskFull
        self.ep = worker.lib.UCXEndpoint.create(worker.worker, host, port, True)
        recv_tag = hash64bits("msg_tag", os.urandom(16), self.ep.handle)
        peer = bytearray(16)
        worker.wait([self.ep.stream_recv(Array(peer))], deadline)
        worker.wait([self.ep.stream_send(Array(struct.pack("QQ", recv_tag, hash64bits(recv_tag))))], deadline)
        send_tag, check = struct.unpack("QQ", peer)
        if check != hash64bits(send_tag):
            raise ConnectionError("UCX handshake: the listener's tag fails its checksum")
        self._tags = {("send", None): Tag(send_tag), ("recv", None): Tag(recv_tag)}

    def _tag_for(self, way: str, tag: int | None) -> Any:
        key = (way, tag)
        if key not in self._tags:
            self._tags[key] = self._tag(self._hash(self._tags[(way, None)].value, hash(tag)))
        return self._tags[key]

    def send(self, buffer: Any, tag: int | None = None) -> Any:
        """Post a send of buffer (host or CUDA array); the request completes once UCX no longer needs it."""
        return self.ep.tag_send(self._array(buffer), self._tag_for("send", tag))

    def recv(self, buffer: Any, tag: int | None = None) -> Any:
        """Post a receive straight into buffer."""
        return self.ep.tag_recv(self._array(buffer), self._tag_for("recv", tag), self._mask)

    def abort(self) -> None:
        """Close at once; UCX cancels the endpoint's outstanding requests, so nothing lands later."""
        self.ep.close_blocking(period=10**9, max_attempts=1)
