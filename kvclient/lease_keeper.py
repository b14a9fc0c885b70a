"""LeaseKeeper: renews a client's write leases in the background while it computes the blocks.

A lease's TTL is what lets waiters take over from a dead writer, so it is kept
short; a live writer whose computation outlasts it (a long prompt on a slow
device) would lose its lease and the blocks would be computed twice. The keeper
renews every third of the TTL until it is closed, so the lease lapses at most one
TTL after the writer stops renewing, whether it finished or died.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Sequence

from kvclient.errors import KVStoreError
from kvwire.keys import BlockKey

if TYPE_CHECKING:
    from kvclient.client import KVClient

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, client: "KVClient", keys: Sequence[BlockKey], ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("a kept lease needs a positive TTL")
        self._client, self._keys, self._ttl_s = client, list(keys), ttl_s
        self._stop = threading.Event()
        self.renewals = 0
        self._thread = threading.Thread(target=self._run, name="kv-lease-keeper", daemon=True)
        if self._keys:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._ttl_s / 3):
            try:
                self._client.renew(self._keys, self._ttl_s)
                self.renewals += 1
            except KVStoreError as err:  # the server may be restarting; the next tick tries again
                log.warning("lease renewal failed", extra={"keys": len(self._keys), "error": str(err)})

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> "LeaseKeeper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
