"""The server's logging: the shared key=value line (kvwire/logs.py) and a throttle for messages a caller can trigger."""
from __future__ import annotations

import threading
import time

from kvwire.logs import setup_logging  # noqa: F401  (what kvstore.cli sets up)


class Throttle:
    """Whether a message keyed by name may be logged now: once per every_s per key, so a caller who can
    trigger an error cannot grow the log with it."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.every_s) < self.every_s:
                return False
            self._last[key] = now
            return True
