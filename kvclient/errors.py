"""kvstore's exception types and their gRPC status codes, in one table.

The server raises these where a problem is found; kvstore/service.py maps them to
a status once, and the client maps a status back once (from_rpc_error), carrying
the exact type name in trailing metadata so callers can catch precise errors.
"""
from __future__ import annotations

import grpc

ERROR_TYPE_METADATA = "kvstore-error-type"


class KVStoreError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequestError(KVStoreError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class SizeMismatchError(InvalidRequestError):
    pass


class BlockTooLargeError(InvalidRequestError):
    pass


class ChecksumMismatchError(KVStoreError):
    code = grpc.StatusCode.DATA_LOSS


class FingerprintMismatchError(KVStoreError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class BlockNotFoundError(KVStoreError):
    code = grpc.StatusCode.NOT_FOUND


class LeaseError(KVStoreError):
    """A lease is unknown, expired, or held by somebody else."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class CapacityExhaustedError(KVStoreError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SsdWriteError(CapacityExhaustedError):
    """LMDB refused a write: the data disk or the LMDB map is full, or the disk failed."""


class NotDurableError(CapacityExhaustedError):
    """A durable put could not write its blocks to the SSD tier; none of them was committed."""


class UnauthenticatedError(KVStoreError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(KVStoreError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(KVStoreError):
    """The server is draining or shutting down; retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class TransferError(KVStoreError):
    """A data-plane transfer failed or was interrupted; no partial data was returned."""

    code = grpc.StatusCode.ABORTED


class TimeoutError_(KVStoreError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


ERROR_TYPES: dict[str, type[KVStoreError]] = {
    cls.__name__: cls
    for cls in (
        KVStoreError,
        InvalidRequestError,
        SizeMismatchError,
        BlockTooLargeError,
        ChecksumMismatchError,
        FingerprintMismatchError,
        BlockNotFoundError,
        LeaseError,
        CapacityExhaustedError,
        SsdWriteError,
        NotDurableError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        TransferError,
        TimeoutError_,
    )
}

_BY_CODE: dict[grpc.StatusCode, type[KVStoreError]] = {}
for _cls in ERROR_TYPES.values():
    _BY_CODE.setdefault(_cls.code, _cls)


def from_rpc_error(err: grpc.RpcError) -> KVStoreError:
    """Turn a failed call back into the exception type the server raised."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    type_name = None
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_TYPE_METADATA:
            type_name = value
    cls = ERROR_TYPES.get(type_name or "") or _BY_CODE.get(code, KVStoreError)
    exc = cls(details or code.name)
    exc.status_code = code  # type: ignore[attr-defined]
    return exc
