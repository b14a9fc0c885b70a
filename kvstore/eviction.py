"""The background worker that keeps the host tier under its watermarks and reaps expired leases.

Demotion runs here, off the request path; the store's synchronous _make_room is only
the fallback when writes outpace this worker.
"""
from __future__ import annotations

import logging
import threading

from kvstore.store import Store

log = logging.getLogger(__name__)


class BackgroundWorker:
    def __init__(self, store: Store, interval_s: float = 0.05) -> None:
        self.store = store
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-demoter", daemon=True)

    def start(self) -> "BackgroundWorker":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.reap_expired()
                self.store.demote_cold()
            except Exception:  # keep serving; a failed pass is retried next tick
                if self.store.closed:
                    return
                log.exception("background pass failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
