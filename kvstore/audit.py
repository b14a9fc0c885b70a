"""The audit log: one JSON line per admin action that changes the store (who, what, how many).

Appended to <data_dir>/audit.log and flushed per record, so a crash loses at most the
action in progress; the same record goes to the `kvstore.audit` logger for log shipping.
It records selectors and counts, never payload bytes. The file is the owner's alone (0600):
it names tenants and clients.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from kvstore.store import Caller

log = logging.getLogger("kvstore.audit")


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


class AuditLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()

    def record(self, caller: Caller, action: str, target: dict[str, Any], **counts: int) -> None:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
            "tenant": caller.tenant,
            "client_id": caller.client_id,
            "action": action,
            "target": target,
            **counts,
        }
        line = json.dumps(entry, sort_keys=True, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8", opener=_owner_only) as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("admin action: %s", line)
