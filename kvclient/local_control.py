"""LocalControl: the control channel over the server's Unix control socket (kvstore/local_control.py).

A gRPC unary round trip costs ~0.55 ms of Python machinery even on loopback; this path
costs about a tenth of that, which matters for a same-host engine paying several control
calls before its first token. It carries the same protobuf messages in local_wire frames,
so its typed calls are control.ProtoControl's; a call that ends in a status other than OK
raises the domain error that status names, as a gRPC call does (errors.from_status).
Streaming calls and inline payloads stay on gRPC (control.GrpcControl).

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
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass

from kvclient.control import DataPlaneInfo, GrpcControl, Metadata, PinGrant, ProtoControl
from kvclient.errors import ERROR_TYPE_METADATA, KVStoreError, UnavailableError, error_for, from_status
from kvwire import pin_codec
from kvwire.local_wire import (BUSY_ERROR_TYPE, IDLE_ERROR_TYPE, FrameError, await_readable, decode_response, encode_request,
                               method_path, read_frame, unary_methods)

log = logging.getLogger(__name__)

MAX_IDLE_CONNECTIONS = 8  # kept for reuse after a burst of concurrent calls; more are closed when given back
# A caller waits for its answer busy-polling this long before it blocks (local_wire.await_readable): most answers
# come within it, and a blocked reader's wakeup cost ~0.1 ms of a 0.3 ms Pin. KVSTORE_CLIENT_BUSY_POLL_US; 0 is off.
ANSWER_POLL_S = int(os.environ.get("KVSTORE_CLIENT_BUSY_POLL_US", "1000")) / 1e6
# method name -> (frame path, response message class): the KVStore service's unary methods
_METHODS = {m.name: (method_path(m), GetMessageClass(m.output_type)) for m in unary_methods()}


def _closed_idle(body: memoryview) -> bool:
    """Whether a response is the server's notice that it closed this connection unread, after it sat idle."""
    if not body or body[0] != grpc.StatusCode.UNAVAILABLE.value[0]:
        return False
    return (ERROR_TYPE_METADATA, IDLE_ERROR_TYPE) in decode_response(body).trailing_metadata


def _unavailable(path: str, what: str, err: BaseException) -> KVStoreError:
    return error_for("UNAVAILABLE", "", f"local control socket {path}: {what}: {err}")


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
        """Send one request frame and return the response body; raises UnavailableError or TimeoutError_."""
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
                raise error_for("DEADLINE_EXCEEDED", "", "Deadline Exceeded") from None
            except OSError as err:
                sock.close()
                raise _unavailable(self.path, "send failed", err) from None
            try:
                if deadline is not None:
                    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                await_readable(sock, ANSWER_POLL_S)
                body = read_frame(sock)
                if body is None:
                    raise ConnectionResetError("closed by the server before it answered")
            except socket.timeout:
                sock.close()  # an answer may still come: this connection is out of step now
                raise error_for("DEADLINE_EXCEEDED", "", "Deadline Exceeded") from None
            except OSError as err:  # FrameError included
                sock.close()
                raise _unavailable(self.path, "no answer", err) from None
            if pooled and _closed_idle(body):
                sock.close()
                if attempt == 0:  # the server closed it unread: safe to send again, on a new connection
                    self._drop_idle()  # as old as this one, so likely closed too
                    continue
                raise error_for("UNAVAILABLE", "", decode_response(body).details)
            self._give(sock)
            return body
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop_idle()


class LocalControl(ProtoControl):
    """The typed control calls over the local socket; a call the server turns away at its connection limit goes
    over `fallback` (the client's gRPC channel), or fails as RESOURCE_EXHAUSTED without one."""

    path = "local"

    def __init__(self, socket_path: str, metadata: Metadata, fallback: GrpcControl | None, timeout_s: float = 30.0) -> None:
        self.socket_path, self.metadata, self.timeout_s = socket_path, metadata, timeout_s
        self._fallback = fallback
        self._pool = ConnectionPool(socket_path)

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        payload = self._call_bytes(method, request.SerializeToString(), timeout_s)
        if payload is None:
            return self._fallback.call(method, request, timeout_s)
        return _METHODS[method][1].FromString(payload)

    def pin(self, fingerprint_id, keys, release_pin_ids=(), prefix_only=False, ttl_ms=0, timeout_s=None):
        """Pin's messages in their wire bytes (kvwire/pin_codec.py): for hundreds of keys, building and reading
        the message objects cost more than the round trip. The answer's columns are read as arrays
        (decode_response_columns): an int object per value only for the values read."""
        request = pin_codec.encode_request(fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only)
        payload = self._call_bytes("Pin", request, timeout_s)
        if payload is None:
            return self._fallback.pin(fingerprint_id, keys, release_pin_ids, prefix_only, ttl_ms, timeout_s)
        r = pin_codec.decode_response_columns(payload)
        return PinGrant(r.pin_id, r.expires_unix_ms, r.offsets, r.lengths, r.checksums, r.tiers, r.hbm_offsets, r.hbm_pool_id,
                        r.payload_bytes)

    def _call_bytes(self, method: str, request: bytes, timeout_s: float | None) -> memoryview | None:
        """The OK answer's payload, or None when the server turned the call away at its connection limit
        and the fallback channel is to carry it; any other status raises its domain error."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            frame = encode_request(_METHODS[method][0], timeout, self.metadata, request)
        except FrameError as err:
            raise error_for("RESOURCE_EXHAUSTED", "", str(err)) from None
        response = decode_response(self._pool.round_trip(frame, timeout))
        if response.code is not grpc.StatusCode.OK:
            busy = (ERROR_TYPE_METADATA, BUSY_ERROR_TYPE) in response.trailing_metadata  # the server's connection limit
            if busy and self._fallback is not None:
                return None
            raise from_status(response.code.name, response.details, response.trailing_metadata)
        return response.payload

    def close(self) -> None:
        self._pool.close()


def open_local(expected: DataPlaneInfo, metadata: Metadata, fallback: GrpcControl, timeout_s: float = 30.0) -> LocalControl:
    """A channel over the socket the server advertised, once a DataPlane call over it answered as the server did over gRPC.

    The probe is authenticated like any call. Raises a KVStoreError saying why the socket is not usable.
    """
    control = LocalControl(expected.local_control_socket, metadata, fallback, timeout_s)
    try:
        info = control.data_plane()
        if (info.host_id, info.shm_name, info.local_control_socket) != (expected.host_id, expected.shm_name, expected.local_control_socket):
            raise UnavailableError(f"{expected.local_control_socket} answers for another server")
    except KVStoreError:
        control.close()
        raise
    return control
