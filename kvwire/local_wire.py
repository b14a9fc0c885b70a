"""The local control socket's frames, shared by kvstore/local_control.py (server) and kvclient/local_control.py (client).

A frame carries exactly what a gRPC unary call carries, so the server answers a call
from the socket with the same request layer and message table as the same call over
gRPC, and the client maps the answer as it maps a gRPC status. A frame is a u32 body length, then the body (little-endian):

    request:  u16 n + method path ("/kvstore.v1.KVStore/Pin") | f64 timeout_s (< 0: none) | metadata | request protobuf
    response: u8 status code | u32 n + details (UTF-8) | trailing metadata | response protobuf (empty unless OK)
    metadata: u16 pairs, each u16 n + key | u32 n + value (UTF-8, except "-bin" keys, which stay bytes as in gRPC)

The envelope is encoded and decoded by kvwire._native (csrc/kvnative/frames.c) where it is built;
the functions named *_reference are the definition, and the answer for anything the native code
leaves to them (tests/kvwire/test_native.py holds the two to the same bytes).

A connection carries one call at a time (request, then its response), so a read never
holds bytes of the next frame. The server says why it closes a connection that sat
idle, in a response frame of its own (IDLE_ERROR_TYPE) that answers no request: a
client reading it knows the request it may just have sent was never read.
"""
from __future__ import annotations

import socket
import struct
import time
from typing import Iterable, NamedTuple, Sequence

import grpc
from google.protobuf.descriptor import MethodDescriptor

from kvwire.defaults import MAX_MESSAGE_BYTES
from kvwire.native import native
from kvwire.v1 import kvstore_pb2 as pb

Metadata = tuple[tuple[str, str | bytes], ...]

SERVICE = pb.DESCRIPTOR.services_by_name["KVStore"]
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES + (1 << 20)  # gRPC's message cap on both sides, plus the envelope
FIRST_READ_BYTES = 64 << 10  # a small frame arrives whole in one recv: one syscall per answer, not two
# The error type (ERROR_TYPE_METADATA) of a call the server turned away at its connection limit:
# the stub sends that call over gRPC instead.
BUSY_ERROR_TYPE = "LocalControlBusy"
# The error type of the frame the server sends before closing a connection idle too long: no request was read.
IDLE_ERROR_TYPE = "LocalControlIdle"

_LEN = struct.Struct("<I")
_U16 = struct.Struct("<H")
_F64 = struct.Struct("<d")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class FrameError(ConnectionError):
    """The peer broke the framing (closed mid-frame, or sent something no peer of ours sends)."""


def method_path(method: MethodDescriptor) -> str:
    return f"/{SERVICE.full_name}/{method.name}"


def unary_methods() -> list[MethodDescriptor]:
    """The calls the socket carries: the KVStore service's unary-unary methods; streams stay on gRPC."""
    return [m for m in SERVICE.methods if not m.client_streaming and not m.server_streaming]


class Request(NamedTuple):
    """A decoded request frame. A tuple, not a frozen dataclass: built for every call, and a frozen
    dataclass's __init__ cost as much as the native decode itself."""

    method: str
    timeout_s: float | None
    metadata: Metadata
    payload: memoryview  # a view of the frame: protobuf parses it without a copy


class Response(NamedTuple):
    """A decoded response frame (a tuple, as Request)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: Metadata
    payload: memoryview


def _encode_metadata(pairs: Iterable[tuple[str, str | bytes]]) -> list[bytes]:
    pairs = list(pairs)
    parts = [_U16.pack(len(pairs))]
    for key, value in pairs:
        k = key.encode()
        v = value if isinstance(value, bytes) else str(value).encode()
        parts += [_U16.pack(len(k)), k, _LEN.pack(len(v)), v]
    return parts


def _decode_metadata(body: memoryview, at: int) -> tuple[Metadata, int]:
    (count,) = _U16.unpack_from(body, at)
    at += 2
    pairs = []
    for _ in range(count):
        (n,) = _U16.unpack_from(body, at)
        key = bytes(body[at + 2 : at + 2 + n]).decode()
        at += 2 + n
        (n,) = _LEN.unpack_from(body, at)
        value = bytes(body[at + 4 : at + 4 + n])
        at += 4 + n
        pairs.append((key, value if key.endswith("-bin") else value.decode()))
    return tuple(pairs), at


def _frame(parts: Sequence[bytes]) -> bytes:
    size = sum(map(len, parts))
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    return b"".join([_LEN.pack(size), *parts])


def encode_request(method: str, timeout_s: float | None, metadata: Iterable[tuple[str, str | bytes]], payload: bytes) -> bytes:
    if native is not None:
        frame = native.encode_request(method, timeout_s, metadata, payload, MAX_FRAME_BYTES)
        if frame is not NotImplemented:
            return frame
    return encode_request_reference(method, timeout_s, metadata, payload)


def decode_request(body: memoryview) -> Request:
    if native is not None:
        fields = native.decode_request(body)
        if fields is not NotImplemented:
            method, timeout_s, metadata, at = fields
            return Request(method, None if timeout_s < 0 else timeout_s, metadata, body[at:])
    return decode_request_reference(body)


def encode_response(code: grpc.StatusCode, details: str, trailing_metadata: Iterable[tuple[str, str | bytes]], payload: bytes) -> bytes:
    if native is not None:
        frame = native.encode_response(code.value[0], details, trailing_metadata, payload, MAX_FRAME_BYTES)
        if frame is not NotImplemented:
            return frame
    return encode_response_reference(code, details, trailing_metadata, payload)


def decode_response(body: memoryview) -> Response:
    if native is not None:
        fields = native.decode_response(body)
        if fields is not NotImplemented and fields[0] in _CODES:
            code, details, trailing, at = fields
            return Response(_CODES[code], details, trailing, body[at:])
    return decode_response_reference(body)


def encode_request_reference(method: str, timeout_s: float | None, metadata: Iterable[tuple[str, str | bytes]], payload: bytes) -> bytes:
    m = method.encode()
    return _frame([_U16.pack(len(m)), m, _F64.pack(-1.0 if timeout_s is None else timeout_s), *_encode_metadata(metadata), payload])


def decode_request_reference(body: memoryview) -> Request:
    try:
        (n,) = _U16.unpack_from(body, 0)
        method = bytes(body[2 : 2 + n]).decode()
        (timeout_s,) = _F64.unpack_from(body, 2 + n)
        metadata, at = _decode_metadata(body, 10 + n)
    except (struct.error, UnicodeDecodeError) as err:
        raise FrameError(f"malformed request frame: {err}") from None
    return Request(method, None if timeout_s < 0 else timeout_s, metadata, body[at:])


def encode_response_reference(code: grpc.StatusCode, details: str, trailing_metadata: Iterable[tuple[str, str | bytes]], payload: bytes) -> bytes:
    d = details.encode()
    return _frame([bytes((code.value[0],)), _LEN.pack(len(d)), d, *_encode_metadata(trailing_metadata), payload])


def decode_response_reference(body: memoryview) -> Response:
    try:
        code = _CODES[body[0]]
        (n,) = _LEN.unpack_from(body, 1)
        details = bytes(body[5 : 5 + n]).decode()
        trailing, at = _decode_metadata(body, 5 + n)
    except (IndexError, KeyError, struct.error, UnicodeDecodeError) as err:
        raise FrameError(f"malformed response frame: {err!r}") from None
    return Response(code, details, trailing, body[at:])


def await_readable(sock: socket.socket, spin_s: float) -> None:
    """Busy-poll sock for up to spin_s before the blocking read that follows (kvnative poll_readable, GIL
    released). A reader woken from a blocking recv pays the kernel's wakeup and reschedule, which on hosts
    whose cores idle between calls measured ~0.1-0.3 ms of a ~0.3 ms prefix Pin; polling keeps the reader
    on its core. Without the native module it does nothing: the read blocks as it always did."""
    if spin_s > 0 and native is not None:
        native.poll_readable(sock.fileno(), int(spin_s * 1e9))


def read_frame(sock: socket.socket, frame_s: float | None = None) -> memoryview | None:
    """The next frame's body; None when the peer closed cleanly between frames.

    The first read waits under the socket's own timeout. frame_s: once a frame has
    started, the rest must arrive within this many seconds, or FrameError (a peer that
    stalls mid-frame must not hold the reader forever).
    """
    chunk = sock.recv(FIRST_READ_BYTES)
    if not chunk:
        return None
    deadline = None if frame_s is None else time.monotonic() + frame_s

    def rest_of_frame() -> None:
        if deadline is not None:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise FrameError(f"frame not complete within {frame_s:g} s")
            sock.settimeout(left_s)

    try:
        while len(chunk) < _LEN.size:
            rest_of_frame()
            more = sock.recv(_LEN.size - len(chunk))
            if not more:
                raise FrameError("connection closed inside a frame header")
            chunk += more
        (size,) = _LEN.unpack_from(chunk)
        have = len(chunk) - _LEN.size
        if size > MAX_FRAME_BYTES or have > size:
            raise FrameError(f"bad frame length {size} ({have} bytes read)")
        if have == size:
            return memoryview(chunk)[_LEN.size :]
        body = bytearray(size)
        body[:have] = memoryview(chunk)[_LEN.size :]
        view = memoryview(body)
        while have < size:
            rest_of_frame()
            got = sock.recv_into(view[have:])
            if not got:
                raise FrameError(f"connection closed inside a frame ({have} of {size} bytes)")
            have += got
        return view
    except socket.timeout:
        if deadline is None:
            raise  # the caller's own timeout
        raise FrameError(f"frame not complete within {frame_s:g} s") from None
