"""The client's side of the error table: kvstore's exception types (kvwire/errors.py), and a failed
gRPC call turned back into the type the server raised, once, here.

Everything a caller catches is importable from this module (or from kvclient).
"""
from __future__ import annotations

import grpc

from kvwire.errors import *  # noqa: F401,F403  (the public exception types)
from kvwire.errors import ERROR_TYPE_METADATA, KVStoreError, error_for


def from_rpc_error(err: grpc.RpcError) -> KVStoreError:
    """Turn a failed call back into the exception type the server raised."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    type_name = ""
    for key, value in (err.trailing_metadata() if hasattr(err, "trailing_metadata") else None) or ():
        if key == ERROR_TYPE_METADATA:
            type_name = value
    return error_for(code.name, type_name, details)
