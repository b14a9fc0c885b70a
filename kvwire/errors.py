"""kvstore's exception types and the status each one carries, in one table.

Domain errors, not transport errors: each class names its status in gRPC's vocabulary
("INVALID_ARGUMENT", ...) as a plain string, which every front door maps once (gRPC in
kvstore/service.py, the local socket and UCX in their own adapters) and the client maps
back once (kvclient/errors.py), carrying the exact type name so callers catch precise errors.
This module imports no transport.
"""
from __future__ import annotations

ERROR_TYPE_METADATA = "kvstore-error-type"


class KVStoreError(Exception):
    status: str = "INTERNAL"


class InvalidRequestError(KVStoreError):
    status = "INVALID_ARGUMENT"


class SizeMismatchError(InvalidRequestError):
    pass


class BlockTooLargeError(InvalidRequestError):
    pass


class ChecksumMismatchError(KVStoreError):
    status = "DATA_LOSS"


class FingerprintMismatchError(KVStoreError):
    status = "FAILED_PRECONDITION"


class BlockNotFoundError(KVStoreError):
    status = "NOT_FOUND"


class LeaseError(KVStoreError):
    """A lease is unknown, expired, or held by somebody else."""

    status = "FAILED_PRECONDITION"


class CapacityExhaustedError(KVStoreError):
    status = "RESOURCE_EXHAUSTED"


class SsdWriteError(CapacityExhaustedError):
    """LMDB refused a write: the data disk or the LMDB map is full, or the disk failed."""


class NotDurableError(CapacityExhaustedError):
    """A durable put could not write its blocks to the SSD tier; none of them was committed."""


class PeerBusyError(KVStoreError):
    """Cluster mode: a holder is already sending as many blocks to peers as it allows (peer_max_inflight);
    the reader asks another holder. Says nothing about the peer's health: no breaker counts it."""

    status = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(KVStoreError):
    status = "UNAUTHENTICATED"


class PermissionDeniedError(KVStoreError):
    status = "PERMISSION_DENIED"


class UnavailableError(KVStoreError):
    """The server is draining or shutting down; retry elsewhere."""

    status = "UNAVAILABLE"


class FencedError(UnavailableError):
    """Cluster mode: this node lost its membership lease (partitioned from etcd) and serves no peer, or in
    strict mode no reader either, until it has rejoined."""


class StaleViewError(KVStoreError):
    """Cluster mode: a peer call named an incarnation of this node that is not the current one; refresh the view."""

    status = "FAILED_PRECONDITION"


class TransferError(KVStoreError):
    """A data-plane transfer failed or was interrupted; no partial data was returned."""

    status = "ABORTED"


class TimeoutError_(KVStoreError):
    status = "DEADLINE_EXCEEDED"


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
        PeerBusyError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        FencedError,
        StaleViewError,
        TransferError,
        TimeoutError_,
    )
}

BY_STATUS: dict[str, type[KVStoreError]] = {}
for _cls in ERROR_TYPES.values():
    BY_STATUS.setdefault(_cls.status, _cls)


def error_for(status: str, type_name: str, detail: str) -> KVStoreError:
    """The exception a peer raised, from the status and type name that crossed the wire."""
    cls = ERROR_TYPES.get(type_name) or BY_STATUS.get(status, KVStoreError)
    exc = cls(detail or status)
    exc.status = status
    return exc
