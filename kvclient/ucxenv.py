"""The one place that imports ucxx, after setting the project's UCX environment defaults.

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

start_context() creates ucxx's context with Python futures: a request's completion
resolves an asyncio future (ucxx's notifier thread) instead of every awaiting
coroutine polling with asyncio.sleep(0), ucxx's default. Polling kept each UCX loop
at 100% of a core per process with requests in flight; with four clients and a
server on two cores, the polling loops starved the threads that actually move the
bytes, and calls stalled for seconds (long enough for write leases to expire).
"""
from __future__ import annotations

import os
from types import ModuleType

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
