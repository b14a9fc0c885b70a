"""One helper thread a client object runs work on beside its caller, started on first use.

Owns the thread's life across fork: a child forked from a process whose helper ran has none of the
parent's threads, so the first submit in the child starts its own. Used by the shm read-ahead (a copy
while the Pin is in flight) and by large puts (a window's Commit while the next window is copied).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class HelperThread:
    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            self._pid = os.getpid()
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Waits for what was submitted; a later submit starts a new thread."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown()
        self._pool = None
