"""Defaults and names both sides must agree on: the address, metadata header names, paths, limits.

One place, so a client and a server built from one tree cannot disagree, and a reader finds
each number once. Server settings that operators tune live in kvstore/config.py and take
their defaults from here.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_PORT = 7480
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"

# gRPC metadata (and local-socket frame metadata) header names.
AUTH_METADATA = "authorization"  # "Bearer <token>": the only source of a caller's tenant
TENANT_METADATA = "kvstore-tenant"  # a claim, checked against the token; the tenant only without auth
CLIENT_ID_METADATA = "kvstore-client-id"  # a name the client picks; owns leases and pins within its tenant

SHM_DIR = Path("/dev/shm")  # where the host pool lives, mapped by same-host clients
MAX_MESSAGE_BYTES = 256 << 20  # gRPC send/receive limit on both sides
LOCAL_CONTROL_MAX_CONNECTIONS = 256  # threads the local control socket serves; calls beyond go over gRPC
MAX_NAME_BYTES = 256  # tenant names and client ids
