"""host_id(): equal for two processes on the same host and kernel boot, so a client can detect co-location.

Shared by the server (which publishes it in DataPlane) and the client (which
compares it before mapping the server's shared-memory pool).
"""
from __future__ import annotations

import socket
from pathlib import Path


def host_id() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
