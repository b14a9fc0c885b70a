"""The client's side of the error table: kvstore's exception types (kvwire/errors.py), and a failed
call's status turned back into the type the server raised, once, here (gRPC and the local socket alike).

Everything a caller catches is importable from this module (or from kvclient).
"""
from __future__ import annotations

from typing import Iterable

import grpc

from kvwire.errors import *  # noqa: F401,F403  (the public exception types)
from kvwire.errors import ERROR_TYPE_METADATA, KVStoreError, error_for


def from_status(status: str, details: str, trailing_metadata: Iterable[tuple[str, str | bytes]] | None = ()) -> KVStoreError:
    """The exception a server raised, from the status name, details and trailing metadata of its answer."""
    type_name = ""
    for key, value in trailing_metadata or ():
        if key == ERROR_TYPE_METADATA:
            type_name = value
    return error_for(status, type_name, details)


def from_rpc_error(err: grpc.RpcError) -> KVStoreError:
    """Turn a failed gRPC call back into the exception type the server raised."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code.name, details, err.trailing_metadata() if hasattr(err, "trailing_metadata") else None)
