"""Same-host control channel: the KVStore service's unary calls over a Unix socket, answered by the request layer.

A Python gRPC unary round trip costs ~0.55 ms even on loopback, nearly all of it gRPC's
own machinery; a Unix-socket round trip costs ~0.04 ms. Same-host clients, which already
move bytes through the shared-memory pool, send Pin/Lookup/Reserve/Commit here instead.

This module owns the listener, the peer check, and turning frames (kvwire/local_wire.py)
into calls: a frame's method is looked up in rpc_codec's table, the one the gRPC servicer
answers with, its caller authenticated from the frame's metadata as gRPC's is, and the
answer, or the error raised, encoded as a status frame by this module's one table
(status_frame), which says what gRPC's says. Request metrics are the gRPC interceptor's,
recorded through its observe_local.

Trust boundary as the shm pool's (docs/security.md): the socket file is mode 0600, a peer
whose uid (SO_PEERCRED) is not the server's is refused, and tokens are checked per call
as over gRPC. A thread per connection with blocking I/O: a connection carries one call
at a time, so a client opens as many as it has calls in flight.

No peer holds a thread for nothing: a frame once started must arrive within read_s, and
a connection with no call for idle_s is told so (local_wire.IDLE_ERROR_TYPE) and closed,
which the client's pool expects. A Wait ends when its peer hangs up (Call.is_active).
With busy_poll_s, a connection thread that has answered a call polls its socket for the next one
that long (GIL released) before it blocks, so an engine that calls every few milliseconds finds its
reader awake; at most POLLERS threads poll at once, so a small host's cores are not all spent waiting.

A request that does not decode is the caller's mistake (INVALID_ARGUMENT, logged at debug
level); a failure of the server's own is answered INTERNAL, its traceback logged at most
once a minute per method (StoreAPI.refusal), so no caller can grow the log at will.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from kvwire.defaults import LOCAL_CONTROL_MAX_CONNECTIONS
from kvwire.errors import ERROR_TYPE_METADATA, InvalidRequestError, KVStoreError, PermissionDeniedError
from kvwire.local_wire import (BUSY_ERROR_TYPE, IDLE_ERROR_TYPE, FrameError, Metadata, Request, await_readable, decode_request,
                               encode_response, read_frame)
from kvstore import rpc_codec as codec
from kvstore.api import StoreAPI
from kvstore.auth import Authenticator

log = logging.getLogger(__name__)

# sockaddr_un.sun_path is 108 bytes, NUL included.
MAX_SOCKET_PATH_BYTES = 107
REFUSED_PEER_READ_S = 2.0
DEFAULT_MAX_CONNECTIONS = LOCAL_CONTROL_MAX_CONNECTIONS  # a thread each; a client keeps only a few idle
DEFAULT_IDLE_S = 300.0  # ServerConfig.local_control_idle_s
DEFAULT_READ_S = 10.0  # ServerConfig.local_control_read_s
_HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR
POLLERS = max(1, (os.cpu_count() or 1) // 4)  # connection threads busy-polling at once (busy_poll_s)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Observe = Callable[[str, str, float, str], None]  # service, method, started (perf_counter), status code name

# The calls served, by the path a frame names ("/kvstore.v1.KVStore/Pin"): the service's unary ones; streams stay on gRPC.
METHODS: dict[str, codec.Method] = {f"/{m.service}/{m.name}": m for m in codec.UNARY.values()}


def status_frame(err: KVStoreError) -> tuple[grpc.StatusCode, str, Metadata]:
    """The socket's status table, gRPC's (service.abort) in frame form: status, detail, and the error's type name."""
    return grpc.StatusCode[err.status], str(err), ((ERROR_TYPE_METADATA, type(err).__name__),)


class Call:
    """One call's liveness, as gRPC's context.is_active tells a servicer: False once its deadline passed
    or its peer hung up (closed or shut down its side). Reads nothing from the connection."""

    def __init__(self, conn: socket.socket, timeout_s: float | None) -> None:
        self._conn = conn
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def is_active(self) -> bool:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return False
        return not peer_hung_up(self._conn)


def peer_hung_up(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn, _HUNG_UP)
    return any(events & _HUNG_UP for _, events in poller.poll(0))


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED), not from anything it sent."""
    return _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


class LocalControlServer:
    def __init__(self, api: StoreAPI, auth: Authenticator, path: Path, observe: Observe,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, idle_s: float = DEFAULT_IDLE_S,
                 read_s: float = DEFAULT_READ_S, busy_poll_s: float = 0.0) -> None:
        self.api, self.auth = api, auth
        self.busy_poll_s = busy_poll_s
        self._pollers = threading.BoundedSemaphore(POLLERS)
        self.path = str(path)
        self.max_connections = max_connections
        self.idle_s, self.read_s = idle_s, read_s
        self._observe = observe
        self._uid = os.geteuid()
        self._listener: socket.socket | None = None
        self._inode = 0
        self._accepter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._closing = False

    @classmethod
    def start_if_possible(cls, api: StoreAPI, auth: Authenticator, path: Path, observe: Observe,
                          max_connections: int = DEFAULT_MAX_CONNECTIONS, idle_s: float = DEFAULT_IDLE_S,
                          read_s: float = DEFAULT_READ_S, busy_poll_s: float = 0.0) -> "LocalControlServer | None":
        """Start the listener, or log why not and return None: the server runs on without it (gRPC serves every call)."""
        server = cls(api, auth, path, observe, max_connections, idle_s, read_s, busy_poll_s)
        try:
            return server.start()
        except OSError as err:
            log.warning("local control socket off: %s", err)
            return None

    # ---- lifecycle ----------------------------------------------------------------

    def start(self) -> "LocalControlServer":
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH_BYTES:
            raise OSError(f"{self.path} is longer than a Unix socket path may be ({MAX_SOCKET_PATH_BYTES} bytes); set local_control_socket to a shorter one")
        self._claim_path()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            # Before listen(): until then every connect is refused, so nobody gets in under the umask's mode.
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept_loop, name="kvstore-local-accept", daemon=True)
        self._accepter.start()
        log.info("local control socket on %s", self.path)
        return self

    def _claim_path(self) -> None:
        """Remove a socket file left by a server that died; never a live server's socket or a file that is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)
                return
        raise OSError(f"another server is listening on {self.path}")

    def stop(self, grace_s: float = 5.0) -> None:
        """Take no new connections, let calls in progress answer (up to grace_s), then close every connection."""
        if self._listener is None:
            return
        with self._lock:
            self._closing = True
            conns = dict(self._conns)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        self._accepter.join(5)
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        # An idle connection wakes with EOF and closes; one in a call answers first. A client
        # sending on it now gets EPIPE at once, so it knows its request was never read.
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for thread in conns.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        log.info("local control socket closed")

    # ---- connections --------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down by stop()
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                busy = len(self._conns) >= self.max_connections
                thread = threading.Thread(target=self._turn_away if busy else self._serve, args=(conn,),
                                          name="kvstore-local", daemon=True)
                if not busy:
                    self._conns[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            pid, uid, _ = peer_credentials(conn)
            peer = f"unix:pid={pid},uid={uid}"
            if uid != self._uid:
                self._refuse(conn, pid, uid)
                return
            while True:
                conn.settimeout(self.idle_s)  # for the first byte of the next call
                self._poll_for_next_call(conn)
                try:
                    body = read_frame(conn, self.read_s)
                except TimeoutError:
                    self._close_idle(conn)
                    return
                if body is None:
                    return
                answer = self._answer(body, peer, conn)
                conn.settimeout(self.read_s)  # a peer that does not read its answer is stalled too
                conn.sendall(answer)
                self.api.settle_reads()  # a prefix Pin's LRU moves, now that its answer is on its way
        except (OSError, FrameError) as err:
            log.debug("local control connection ended: %s", err)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _poll_for_next_call(self, conn: socket.socket) -> None:
        if self.busy_poll_s > 0 and self._pollers.acquire(blocking=False):
            try:
                await_readable(conn, self.busy_poll_s)
            finally:
                self._pollers.release()

    def _close_idle(self, conn: socket.socket) -> None:
        """Say why before closing: a request the client sent meanwhile is then known to be unread, so it resends it."""
        log.debug("local control connection closed after %g s idle", self.idle_s)
        conn.settimeout(self.read_s)
        conn.sendall(encode_response(grpc.StatusCode.UNAVAILABLE, f"connection closed after {self.idle_s:g} s without a call; reconnect",
                                     ((ERROR_TYPE_METADATA, IDLE_ERROR_TYPE),), b""))

    def _turn_away(self, conn: socket.socket) -> None:
        """Over max_connections (each is a thread here): BUSY_ERROR_TYPE tells the client's stub to send
        this call over gRPC."""
        try:
            self._answer_first_call_and_close(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              f"the local control socket is at its limit of {self.max_connections} connections",
                                              ((ERROR_TYPE_METADATA, BUSY_ERROR_TYPE),))
        except (OSError, FrameError) as err:
            log.debug("turned-away local control connection ended: %s", err)
        finally:
            conn.close()

    def _refuse(self, conn: socket.socket, pid: int, uid: int) -> None:
        log.warning("local control socket: refused pid %d of uid %d (the server runs as uid %d)", pid, uid, self._uid)
        refusal = PermissionDeniedError(f"the local control socket serves only uid {self._uid}'s processes; this one runs as uid {uid}")
        self._answer_first_call_and_close(conn, *status_frame(refusal))

    @staticmethod
    def _answer_first_call_and_close(conn: socket.socket, code: grpc.StatusCode, detail: str, trailing: Metadata = ()) -> None:
        """A connection not served: answer its first call with why, so the peer learns it, and close."""
        conn.settimeout(REFUSED_PEER_READ_S)
        if read_frame(conn, REFUSED_PEER_READ_S) is not None:
            conn.sendall(encode_response(code, detail, trailing, b""))
        conn.close()

    def _answer(self, body: memoryview, peer: str, conn: socket.socket) -> bytes:
        try:
            request = decode_request(body)
        except FrameError as err:  # the frame arrived whole, so the connection is still in step
            return self._undecodable(f"cannot decode request: {err}")
        method = METHODS.get(request.method)
        if method is None:
            # What a gRPC server answers for a method it does not serve (streaming ones included).
            return encode_response(grpc.StatusCode.UNIMPLEMENTED, "Method not found!", (), b"")
        started = time.perf_counter()
        try:
            code, detail, trailing, payload = grpc.StatusCode.OK, "", (), self._call(method, request, peer, conn)
        except KVStoreError as err:
            (code, detail, trailing), payload = status_frame(err), b""
        self._observe(method.service, method.name, started, code.name)
        return encode_response(code, detail, trailing, payload)

    def _call(self, method: codec.Method, request: Request, peer: str, conn: socket.socket) -> bytes:
        """The answer's payload; raises the error to answer instead."""
        try:
            message = method.parse(request.payload)
        except DecodeError as err:
            log.debug("local control: cannot decode %s request: %s", method.name, err)
            raise InvalidRequestError(f"cannot decode {method.name} request: {err}") from None
        try:
            caller = self.auth.caller(request.metadata, peer)
            return method.answer(self.api, caller, message, Call(conn, request.timeout_s).is_active)
        except Exception as err:
            raise self.api.refusal(method.name, err) from None

    @staticmethod
    def _undecodable(detail: str) -> bytes:
        log.debug("local control: %s", detail)
        return encode_response(*status_frame(InvalidRequestError(detail)), b"")
