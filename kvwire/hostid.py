"""host_id(): equal for two processes on the same host and kernel boot, so a client can detect co-location.

Shared by the server (which publishes it in DataPlane) and the client (which
compares it before mapping the server's shared-memory pool).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

HOST_ID_ENV = "KVSTORE_HOST_ID"


def host_id() -> str:
    """KVSTORE_HOST_ID wins: processes in separate network namespaces of one box share a hostname and
    boot id, yet must not map each other's shared memory or sockets (they stand for separate hosts)."""
    if override := os.environ.get(HOST_ID_ENV, "").strip():
        return override
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
