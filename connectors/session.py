"""StoreSession: one process's connection to kvstore for one fingerprint, and what survives an outage.

Shared by the connectors. vLLM's has two halves: the scheduler's takes write leases and pins,
the worker's writes and reads the blocks. The store knows a lease's owner by client id, so both
halves must speak through the same KVClient: in vLLM's single-rank executors they live in one
process, and `session_for` hands both the same session. The session connects lazily and treats any failed
call as an outage: it drops the client, answers "no store" for `retry_after_s`, then connects
again, so vLLM keeps serving (computing instead) while kvstore is down or restarting, and picks
it up again when it is back. Pins taken by the scheduler wait here, by id, for the worker's read.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Protocol, TypeVar

from kvclient.client import KVClient, PinnedBlocks
from kvclient.errors import BlockNotFoundError, ChecksumMismatchError, InvalidRequestError, LeaseError
from kvwire.keys import Fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreSettings(Protocol):
    """Where the store is and how to reach it: the fields a connector's settings must have."""

    address: str
    tenant: str | None
    token: str | None
    transport: str
    timeout_s: float  # per store call
    retry_after_s: float  # after a failed call the store is left alone this long


class StoreUnavailable(Exception):
    """The store failed recently (or never answered); the caller computes instead."""


@dataclass
class ConnectorStats:
    """Counters of one process's connector, for tests, the benchmark and logs."""

    requests_looked_up: int = 0
    requests_waited: int = 0  # waited for blocks another request or engine was computing
    tokens_matched: int = 0  # external tokens promised to vLLM's scheduler
    blocks_loaded: int = 0
    blocks_load_failed: int = 0  # a checksum mismatch, an evicted block, a store error: vLLM recomputed them
    blocks_leased: int = 0
    blocks_saved: int = 0  # committed by this process
    blocks_save_skipped: int = 0  # already present or leased elsewhere when written
    store_errors: int = 0
    reconnects: int = 0
    lookup_s: float = 0.0  # the scheduler's store time: leases, waits, pins
    load_s: float = 0.0  # the worker's: reading blocks and writing them into the pages
    save_s: float = 0.0  # the worker's: gathering pages and writing blocks

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class StoreSession:
    def __init__(self, settings: StoreSettings, fingerprint: Fingerprint) -> None:
        self.settings = settings
        self.fingerprint = fingerprint
        self.stats = ConnectorStats()
        self._client: KVClient | None = None
        self.client_id: str | None = None  # kept across reconnects: the store's leases are this id's
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._pins: dict[int, PinnedBlocks] = {}
        self._pin_ids = itertools.count(1)

    def client(self) -> KVClient:
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._down_until:
                raise StoreUnavailable(f"kvstore at {self.settings.address} failed recently")
            try:
                self._client = KVClient(self.settings.address, self.fingerprint, tenant=self.settings.tenant,
                                        token=self.settings.token, transport=self.settings.transport,
                                        timeout_s=self.settings.timeout_s, client_id=self.client_id)
                self.client_id = self._client.client_id
            except Exception as err:  # noqa: BLE001 - any connect failure is an outage to ride out
                self._mark_down_locked(err)
                raise StoreUnavailable(str(err)) from err
            self.stats.reconnects += 1
            return self._client

    def call(self, what: str, fn: Callable[[KVClient], T], default: T) -> T:
        """fn(client), or default when the store is down or the call fails.

        A missing, corrupt or mis-sized block, or a lease lost to another writer, is an answer (the caller
        computes those tokens or skips that write); any other
        failure is an outage: the client is dropped and the store left alone for retry_after_s.
        """
        try:
            return fn(self.client())
        except StoreUnavailable:
            return default
        except (BlockNotFoundError, ChecksumMismatchError, InvalidRequestError, LeaseError) as err:
            log.info("kvstore %s: %s", what, err)
            return default
        except Exception as err:  # noqa: BLE001 - vLLM must keep serving whatever the store does
            log.warning("kvstore %s failed, computing without the store for %.0f s: %s", what, self.settings.retry_after_s, err)
            self.mark_down(err)
            return default

    def adopt_client_id(self, client_id: str) -> None:
        """Speak as client_id from now on: a vLLM worker in its own process writes the blocks its
        scheduler leased, and the store grants a lease's slot only to the lease's owner."""
        with self._lock:
            if client_id == self.client_id:
                return
            self.client_id = client_id
            client, self._client = self._client, None
        if client is not None:
            _close_quietly(client)

    def mark_down(self, err: BaseException) -> None:
        with self._lock:
            self._mark_down_locked(err)

    def _mark_down_locked(self, err: BaseException) -> None:
        self.stats.store_errors += 1
        self._down_until = time.monotonic() + self.settings.retry_after_s
        client, self._client = self._client, None
        pins, self._pins = list(self._pins.values()), {}
        for pinned in pins:
            try:
                pinned.release(failed=True)
            except Exception:  # noqa: BLE001 - the server drops pins at their TTL anyway
                pass
        if client is not None:
            threading.Thread(target=_close_quietly, args=(client,), name="kvstore-close", daemon=True).start()
        log.debug("kvstore marked down: %r", err)

    # ---- pins handed from the scheduler half to the worker half ------------------------

    def hold_pin(self, pinned: PinnedBlocks) -> int:
        with self._lock:
            pin_ref = next(self._pin_ids)
            self._pins[pin_ref] = pinned
            return pin_ref

    def take_pin(self, pin_ref: int) -> PinnedBlocks | None:
        with self._lock:
            return self._pins.pop(pin_ref, None)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            pins, self._pins = list(self._pins.values()), {}
        for pinned in pins:
            pinned.release()
        if client is not None:
            _close_quietly(client)


def _close_quietly(client: KVClient) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a client of a dead store
        pass


_SESSIONS: dict[tuple[Hashable, bytes], StoreSession] = {}
_SESSIONS_LOCK = threading.Lock()


def session_for(settings: StoreSettings, fingerprint: Fingerprint) -> StoreSession:
    """The process's session for these settings and fingerprint: the same object for both halves."""
    with _SESSIONS_LOCK:
        key = (settings, fingerprint.id)
        if key not in _SESSIONS:
            _SESSIONS[key] = StoreSession(settings, fingerprint)
        return _SESSIONS[key]


def sessions() -> list[StoreSession]:
    """This process's sessions (for tests and the benchmark: their fingerprints and counters)."""
    with _SESSIONS_LOCK:
        return list(_SESSIONS.values())
