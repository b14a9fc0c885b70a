"""The KVStore messages that carry payload (Get's pieces, Write's chunks, Put's blocks) as wire bytes made
from the caller's buffers and read back as views of the received message: no message object holds a payload.

Through the generated classes a 32 MiB Get cost five copies a side (slot -> bytes -> InlineBlock ->
GetResponse -> serialized, and back), about 0.13 GB/s on loopback. Here the sender writes each message
with one join of small protobuf-made headers and memoryviews of the payload (the one copy), and the
receiver takes (offset, length) of each payload in the received bytes and copies it once, to where it
lands. The small fields still go through the generated classes, so the bytes are protobuf's own and any
protobuf reader parses them (tests/kvwire/test_payload_codec.py holds each side to protobuf).

Malformed input raises protobuf's DecodeError, as a message class's FromString would.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from google.protobuf.message import DecodeError

from kvwire.v1 import kvstore_pb2 as pb

_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
_GET_PIECES = (2 << 3) | _LEN  # GetResponse.pieces
_PIECE_DATA = (5 << 3) | _LEN  # BlockPiece.data
_WRITE_DATA = (3 << 3) | _LEN  # WriteChunk.data
_PUT_BLOCKS = (2 << 3) | _LEN  # PutRequest.blocks
_INLINE_DATA = (2 << 3) | _LEN  # InlineBlock.data


def varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value, end of a length-delimited value) for each field of buf[pos:end]; a varint's end is 0,
    a length-delimited field's value is where its bytes start. Fixed-width fields are skipped (none of ours is one)."""
    while pos < end:
        tag, pos = _read_varint(buf, pos, end)
        kind, number = tag & 7, tag >> 3
        if kind == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, value, 0
        elif kind == _LEN:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise DecodeError(f"field {number} runs {pos + n - end} bytes past the end of its message")
            yield number, pos, pos + n
            pos += n
        elif kind in (_I64, _I32):
            pos += 8 if kind == _I64 else 4
            if pos > end:
                raise DecodeError(f"field {number} runs past the end of its message")
        else:
            raise DecodeError(f"field {number} has wire type {kind}, which no KVStore message uses")


# ---- Get: a stream of GetResponse messages, each a run of BlockPieces -------------------------------


class Piece(NamedTuple):
    """Part of a block, as received: data is a view of the received message."""

    key: bytes
    size_bytes: int
    offset: int
    checksum: int
    data: memoryview


def encode_get_responses(blocks: Iterable[tuple[bytes, Any, int]], message_bytes: int) -> Iterator[bytes]:
    """GetResponse messages of about message_bytes of payload each, from (key, payload buffer, checksum) in order;
    a block larger than what is left of a message continues in the next. Each message is one join of the
    payloads' views, so a payload need only stay valid until the message holding its last byte is yielded."""
    parts: list[Any] = []
    filled = 0
    for key, data, checksum in blocks:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        size = len(view)
        offset = 0
        while True:
            n = min(size - offset, max(message_bytes - filled, 1))
            head = pb.BlockPiece(key=key, size_bytes=size, offset=offset, checksum=checksum).SerializeToString()
            head += bytes((_PIECE_DATA,)) + varint(n)
            parts += (bytes((_GET_PIECES,)) + varint(len(head) + n) + head, view[offset : offset + n])
            filled += n
            offset += n
            if filled >= message_bytes:
                yield b"".join(parts)
                parts, filled = [], 0
            if offset >= size:
                break
    if parts:
        yield b"".join(parts)


def decode_get_response(message: bytes) -> list[Piece]:
    """A GetResponse's pieces in order, their data views of message."""
    view = memoryview(message)
    pieces = []
    for number, start, end in _fields(message, 0, len(message)):
        if number != 2 or not end:
            continue
        key, size, offset, checksum, data = b"", 0, 0, 0, None
        for field, value, stop in _fields(message, start, end):
            if field == 1 and stop:
                key = bytes(view[value:stop])
            elif field == 2 and not stop:
                size = value
            elif field == 3 and not stop:
                offset = value
            elif field == 4 and not stop:
                checksum = value
            elif field == 5 and stop:
                data = view[value:stop]
        pieces.append(Piece(key, size, offset, checksum, data if data is not None else view[0:0]))
    return pieces


# ---- Write: a stream of WriteChunks ---------------------------------------------------------------


class WriteChunkFields(NamedTuple):
    lease_id: int
    offset: int
    data: memoryview


def encode_write_chunk(lease_id: int, offset: int, data: Any) -> bytes:
    head = pb.WriteChunk(lease_id=lease_id, offset=offset).SerializeToString()
    return b"".join((head, bytes((_WRITE_DATA,)), varint(len(data)), data))


def decode_write_chunk(message: bytes) -> WriteChunkFields:
    view = memoryview(message)
    lease_id = offset = 0
    data = view[0:0]
    for field, value, stop in _fields(message, 0, len(message)):
        if field == 1 and not stop:
            lease_id = value
        elif field == 2 and not stop:
            offset = value
        elif field == 3 and stop:
            data = view[value:stop]
    return WriteChunkFields(lease_id, offset, data)


# ---- Put: one PutRequest of whole blocks ---------------------------------------------------------


class InlineBlockFields(NamedTuple):
    key: bytes
    data: memoryview
    checksum: int


class PutRequestFields(NamedTuple):
    """A PutRequest's fields by the message's own names (the server's Put handler reads either)."""

    fingerprint_id: bytes
    blocks: list[InlineBlockFields]
    durable: bool


def encode_put_request(fingerprint_id: bytes, keys: Sequence[bytes], payloads: Sequence[Any], checksums: Sequence[int],
                       durable: bool = False) -> bytes:
    parts: list[Any] = [pb.PutRequest(fingerprint_id=fingerprint_id, durable=durable).SerializeToString()]
    for key, data, checksum in zip(keys, payloads, checksums):
        n = len(data)
        head = pb.InlineBlock(key=key).SerializeToString() + bytes((_INLINE_DATA,)) + varint(n)
        tail = pb.InlineBlock(checksum=checksum).SerializeToString()
        parts += (bytes((_PUT_BLOCKS,)) + varint(len(head) + n + len(tail)) + head, data, tail)
    return b"".join(parts)


def decode_put_request(message: bytes | memoryview) -> PutRequestFields:
    view = memoryview(message)
    fingerprint_id, durable, blocks = b"", False, []
    for number, value, stop in _fields(view, 0, len(view)):
        if number == 1 and stop:
            fingerprint_id = bytes(view[value:stop])
        elif number == 3 and not stop:
            durable = bool(value)
        elif number == 2 and stop:
            key, data, checksum = b"", view[0:0], 0
            for field, v, s in _fields(view, value, stop):
                if field == 1 and s:
                    key = bytes(view[v:s])
                elif field == 2 and s:
                    data = view[v:s]
                elif field == 3 and not s:
                    checksum = v
            blocks.append(InlineBlockFields(key, data, checksum))
    return PutRequestFields(fingerprint_id, blocks, durable)
