"""The background worker: keeps the host tier under its watermarks, promotes hot blocks into the HBM tier,
and reaps expired leases and pins.

Demotion runs here, off the request path (placement.py does the moving, eviction.py picks
the victims); a Reserve that finds the pool full makes its own room only when writes outpace
this worker. Each tick also runs erases queued by deletes (a block dropped for a bad checksum),
so LMDB lets go of their records soon.
"""
from __future__ import annotations

import logging
import threading

from kvwire.errors import SsdWriteError
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
                self.store.settle_reads()
                self.store.demote_cold()
                self.store.promote_hot()
                self._erase_pending()
            except Exception:  # keep serving; a failed pass is retried next tick
                if self.store.closed:
                    return
                log.exception("background pass failed")

    def _erase_pending(self) -> None:
        try:
            self.store.placement.erase_pending()
        except SsdWriteError:
            pass  # the tier logged the refusal; the erases stay queued for the next tick

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
