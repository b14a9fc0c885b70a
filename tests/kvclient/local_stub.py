"""A test double for server tests that send raw KVStore messages over the local socket as any caller.

LocalControlStub has the generated KVStoreStub's unary call shape (stub.Pin(request, metadata=...,
timeout=...)) and raises LocalRpcError, a grpc.RpcError with code(), details() and trailing_metadata(),
so a test can run the same assertions over gRPC and over the socket. Underneath it is the client's own
LocalControl (kvclient/local_control.py: the connection pool, the idle-notice retry, the gRPC fallback
at the server's connection limit), one per metadata, whose domain errors are turned back into statuses
here: the client library itself raises domain errors and fakes no gRPC type.
"""
from __future__ import annotations

from typing import Any

import grpc

from kvclient.errors import ERROR_TYPE_METADATA, KVStoreError, from_rpc_error
from kvclient.local_control import LocalControl

Metadata = tuple[tuple[str, str], ...]


class LocalRpcError(grpc.RpcError):
    def __init__(self, err: KVStoreError) -> None:
        super().__init__(f"{err.status}: {err}")
        self._code = grpc.StatusCode[err.status]
        self._details = str(err)
        self._trailing = ((ERROR_TYPE_METADATA, type(err).__name__),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:
        return self._trailing


class _GrpcFallback:
    """A generated stub's calls for LocalControl's fallback, with one caller's metadata."""

    def __init__(self, stub, metadata: Metadata) -> None:
        self._stub, self._metadata = stub, metadata

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class LocalControlStub:
    def __init__(self, socket_path: str, grpc_stub=None) -> None:
        self.socket_path, self._grpc_stub = socket_path, grpc_stub
        self._channels: dict[Metadata, LocalControl] = {}

    def _channel(self, metadata: Metadata) -> LocalControl:
        metadata = tuple(metadata or ())
        if metadata not in self._channels:
            fallback = _GrpcFallback(self._grpc_stub, metadata) if self._grpc_stub is not None else None
            self._channels[metadata] = LocalControl(self.socket_path, metadata, fallback)
        return self._channels[metadata]

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(request, metadata: Metadata = (), timeout: float | None = None):
            try:
                return self._channel(metadata).call(method, request, timeout)
            except KVStoreError as err:
                raise LocalRpcError(err) from None

        return call

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
