"""LocalControlStub: the KVStore stub's unary calls over the server's Unix control socket (kvstore/local_control.py).

A gRPC unary round trip costs ~0.55 ms of Python machinery even on loopback; this path
costs about a tenth of that, which matters for a same-host engine paying several control
calls before its first token. The stub has the generated KVStoreStub's call shape
(stub.Pin(request, metadata=..., timeout=...)), so KVClient._call and PoolControl use it
unchanged, and a failed call raises LocalRpcError, a grpc.RpcError with code(), details()
and trailing_metadata(), which errors.from_rpc_error maps exactly as a gRPC error.
Streaming methods are the gRPC stub's: they stay on gRPC.

Connections are pooled for any number of threads, one call on a connection at a time, and
at most MAX_IDLE_CONNECTIONS stay open between calls. A call the server turns away at its
connection limit goes over gRPC instead. A process forked from this one opens its own (the parent's stay the parent's).

A pooled connection may have been closed by the server meanwhile: it closes connections
idle longer than local_control_idle_s, and a server that went away closes them all. A call
is retried once, on a new connection, only when the server cannot have executed it: its
send failed (EPIPE: the request was never read), or the answer is the server's idle notice
(local_wire.IDLE_ERROR_TYPE), which it sends instead of reading any request. A call that
was sent and then got no answer at all is never retried: the server may have run it.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

import grpc
from google.protobuf.message_factory import GetMessageClass

from kvclient.errors import ERROR_TYPE_METADATA, KVStoreError, UnavailableError
from kvwire.local_wire import (BUSY_ERROR_TYPE, IDLE_ERROR_TYPE, FrameError, Metadata, decode_response, encode_request,
                                 method_path, read_frame, unary_methods)
from kvwire.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

MAX_IDLE_CONNECTIONS = 8  # kept for reuse after a burst of concurrent calls; more are closed when given back


class LocalRpcError(grpc.RpcError):
    """A call over the local socket ended in a status other than OK, shaped as grpc's own errors are."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Metadata = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailing = code, details, trailing_metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def initial_metadata(self) -> Metadata:
        return ()


def _closed_idle(body: memoryview) -> bool:
    """Whether a response is the server's notice that it closed this connection unread, after it sat idle."""
    if not body or body[0] != grpc.StatusCode.UNAVAILABLE.value[0]:
        return False
    return (ERROR_TYPE_METADATA, IDLE_ERROR_TYPE) in decode_response(body).trailing_metadata


def _unavailable(path: str, what: str, err: BaseException) -> LocalRpcError:
    return LocalRpcError(grpc.StatusCode.UNAVAILABLE, f"local control socket {path}: {what}: {err}")


class ConnectionPool:
    """Idle connections to one socket, shared by threads; a connection carries one call at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        """In a forked child: the parent's connections are the parent's. Closing our copies leaves them open
        for it (no shutdown()); the lock is new because a parent thread may have held it at fork."""
        self._lock = threading.Lock()
        idle, self._idle = self._idle, []
        self._pid = os.getpid()
        for sock in idle:
            sock.close()

    def _take(self, timeout_s: float | None) -> tuple[socket.socket, bool]:
        """A connection and whether it was idle in the pool (and so may lead to a server that has gone)."""
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            raise _unavailable(self.path, "cannot connect", err) from None
        return sock, False

    def _give(self, sock: socket.socket) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(sock)
                return
        sock.close()  # beyond a burst's needs: each open connection is a server thread

    def _drop_idle(self) -> None:
        """After one pooled connection turned out closed (the server went away, or closed it as idle): the others,
        idle as long or longer, are likely closed too."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def round_trip(self, frame: bytes, timeout_s: float | None) -> memoryview:
        """Send one request frame and return the response body; raises LocalRpcError (UNAVAILABLE, DEADLINE_EXCEEDED)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for attempt in range(2):
            sock, pooled = self._take(timeout_s)
            try:
                sock.settimeout(timeout_s)
                sock.sendall(frame, socket.MSG_NOSIGNAL)  # EPIPE as an error even where SIGPIPE is not ignored
            except (BrokenPipeError, ConnectionResetError) as err:
                sock.close()
                if pooled and attempt == 0:  # never read by the server: safe to send again, on a new connection
                    self._drop_idle()
                    continue
                raise _unavailable(self.path, "send failed", err) from None
            except socket.timeout:
                sock.close()
                raise LocalRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except OSError as err:
                sock.close()
                raise _unavailable(self.path, "send failed", err) from None
            try:
                if deadline is not None:
                    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                body = read_frame(sock)
                if body is None:
                    raise ConnectionResetError("closed by the server before it answered")
            except socket.timeout:
                sock.close()  # an answer may still come: this connection is out of step now
                raise LocalRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except OSError as err:  # FrameError included
                sock.close()
                raise _unavailable(self.path, "no answer", err) from None
            if pooled and _closed_idle(body):
                sock.close()
                if attempt == 0:  # the server closed it unread: safe to send again, on a new connection
                    self._drop_idle()  # as old as this one, so likely closed too
                    continue
                raise LocalRpcError(grpc.StatusCode.UNAVAILABLE, decode_response(body).details)
            self._give(sock)
            return body
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop_idle()


class _UnaryCall:
    """One method of the stub: called as the generated stub's unary-unary callables are."""

    def __init__(self, pool: ConnectionPool, path: str, response_class: type, grpc_stub, name: str) -> None:
        self._pool, self._path, self._response_class = pool, path, response_class
        self._grpc_stub, self._name = grpc_stub, name

    def __call__(self, request, timeout: float | None = None, metadata: Metadata | None = None, **grpc_options):
        try:
            frame = encode_request(self._path, timeout, metadata or (), request.SerializeToString())
        except FrameError as err:
            raise LocalRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
        response = decode_response(self._pool.round_trip(frame, timeout))
        if response.code is not grpc.StatusCode.OK:
            busy = (ERROR_TYPE_METADATA, BUSY_ERROR_TYPE) in response.trailing_metadata  # the server's connection limit
            if busy and self._grpc_stub is not None:
                return getattr(self._grpc_stub, self._name)(request, timeout=timeout, metadata=metadata, **grpc_options)
            raise LocalRpcError(response.code, response.details, response.trailing_metadata)
        return self._response_class.FromString(response.payload)


class LocalControlStub:
    """KVStoreStub's unary methods over the local socket; every other attribute is the gRPC stub's."""

    def __init__(self, socket_path: str, grpc_stub) -> None:
        self.socket_path = socket_path
        self._grpc_stub = grpc_stub
        self._pool = ConnectionPool(socket_path)
        for method in unary_methods():
            setattr(self, method.name, _UnaryCall(self._pool, method_path(method), GetMessageClass(method.output_type),
                                                  grpc_stub, method.name))

    def __getattr__(self, name: str):
        return getattr(self._grpc_stub, name)

    def close(self) -> None:
        self._pool.close()


def connect(socket_path: str, grpc_stub, call: Callable, expected: pb.DataPlaneResponse) -> LocalControlStub:
    """A stub for the socket the server advertised, once a DataPlane call over it answered as the server did over gRPC.

    call is KVClient._call (metadata, deadline, error mapping), so the probe is authenticated
    like any call. Raises a KVStoreError saying why the socket is not usable.
    """
    stub = LocalControlStub(socket_path, grpc_stub)
    try:
        info = call(stub.DataPlane, pb.DataPlaneRequest())
        if (info.host_id, info.shm_name, info.local_control_socket) != (expected.host_id, expected.shm_name, socket_path):
            raise UnavailableError(f"{socket_path} answers for another server")
    except KVStoreError:
        stub.close()
        raise
    return stub
