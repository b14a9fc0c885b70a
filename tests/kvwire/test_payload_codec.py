"""kvwire/payload_codec.py against protobuf's own messages: what it writes parses as the message, byte-exact, and
what protobuf writes (fields in any order, unknown fields too) it reads back; bad bytes raise DecodeError."""
from __future__ import annotations

import os

import pytest
import xxhash
from google.protobuf.message import DecodeError

from kvwire import payload_codec as codec
from kvwire.v1 import kvstore_pb2 as pb

SIZES = [0, 1, 7, 4095, 4097, 65536, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (3 << 20) + 5]


def blocks_of(sizes: list[int]) -> list[tuple[bytes, bytes, int]]:
    return [(i.to_bytes(16, "little"), os.urandom(n), xxhash.xxh3_64_intdigest(b"%d" % n)) for i, n in enumerate(sizes)]


def reassembled(messages: list[bytes]) -> list[tuple[bytes, bytes, int]]:
    """The blocks in a Get stream, read with protobuf's own GetResponse."""
    out: list[list] = []
    for message in messages:
        for piece in pb.GetResponse.FromString(message).pieces:
            if piece.offset == 0 and (not out or len(out[-1][1]) == out[-1][3]):
                out.append([piece.key, bytearray(), piece.checksum, piece.size_bytes])
            assert (piece.key, piece.offset, piece.size_bytes) == (out[-1][0], len(out[-1][1]), out[-1][3])
            out[-1][1] += piece.data
    return [(k, bytes(d), c) for k, d, c, _ in out]


@pytest.mark.parametrize("message_bytes, sizes", [(1, SIZES[:4]), (4096, SIZES), (1 << 20, SIZES)])
def test_get_stream_is_protobufs_message_and_splits_blocks_at_message_size(message_bytes, sizes):
    blocks = blocks_of(sizes)
    messages = list(codec.encode_get_responses(iter(blocks), message_bytes))
    assert reassembled(messages) == blocks
    payload = [sum(len(p.data) for p in pb.GetResponse.FromString(m).pieces) for m in messages]
    assert all(n <= max(message_bytes, 1) for n in payload)
    assert all(n == message_bytes for n in payload[:-1])  # every message but the last is full
    # and the decoder reads the same pieces protobuf does, as views of the message
    for message in messages:
        ours = codec.decode_get_response(message)
        theirs = pb.GetResponse.FromString(message).pieces
        assert [(p.key, p.size_bytes, p.offset, p.checksum, bytes(p.data)) for p in ours] == \
               [(p.key, p.size_bytes, p.offset, p.checksum, p.data) for p in theirs]
        assert all(isinstance(p.data, memoryview) for p in ours)


def test_payload_views_of_any_buffer_encode_alike():
    data = bytearray(os.urandom(10_000))
    as_bytes = b"".join(codec.encode_get_responses([(b"k" * 16, bytes(data), 5)], 4096))
    as_view = b"".join(codec.encode_get_responses([(b"k" * 16, memoryview(data), 5)], 4096))
    assert as_bytes == as_view


def test_decoder_reads_protobufs_own_bytes_with_unknown_fields():
    piece = pb.BlockPiece(key=b"a" * 16, size_bytes=9, offset=3, checksum=(1 << 64) - 1, data=b"xyz")
    message = pb.GetResponse(pieces=[piece, pb.BlockPiece(key=b"b" * 16, size_bytes=0)]).SerializeToString()
    unknown = bytes([(9 << 3) | 0, 0x96, 0x01]) + bytes([(10 << 3) | 2, 2]) + b"zz" + bytes([(11 << 3) | 1]) + bytes(8)
    decoded = codec.decode_get_response(unknown + message + unknown)
    assert [(p.key, p.size_bytes, p.offset, p.checksum, bytes(p.data)) for p in decoded] == \
           [(b"a" * 16, 9, 3, (1 << 64) - 1, b"xyz"), (b"b" * 16, 0, 0, 0, b"")]


@pytest.mark.parametrize("n", [0, 1, 300, 1 << 20])
def test_write_chunk_round_trips_through_protobuf(n):
    data = os.urandom(n)
    wire = codec.encode_write_chunk(1 << 40, 12345, memoryview(data))
    assert pb.WriteChunk.FromString(wire) == pb.WriteChunk(lease_id=1 << 40, offset=12345, data=data)
    fields = codec.decode_write_chunk(pb.WriteChunk(lease_id=7, offset=8, data=data).SerializeToString())
    assert (fields.lease_id, fields.offset, bytes(fields.data)) == (7, 8, data)


def test_put_request_round_trips_through_protobuf():
    blocks = blocks_of([1, 4097, 1 << 20])
    keys, payloads, crcs = [b[0] for b in blocks], [memoryview(b[1]) for b in blocks], [b[2] for b in blocks]
    wire = codec.encode_put_request(b"f" * 16, keys, payloads, crcs, durable=True)
    expected = pb.PutRequest(fingerprint_id=b"f" * 16, durable=True,
                             blocks=[pb.InlineBlock(key=k, data=d, checksum=c) for k, d, c in blocks])
    assert pb.PutRequest.FromString(wire) == expected
    fields = codec.decode_put_request(expected.SerializeToString())
    assert (fields.fingerprint_id, fields.durable) == (b"f" * 16, True)
    assert [(b.key, bytes(b.data), b.checksum) for b in fields.blocks] == blocks


@pytest.mark.parametrize("decode", [codec.decode_get_response, codec.decode_write_chunk, codec.decode_put_request])
def test_truncated_or_malformed_bytes_raise_decode_error(decode):
    whole = {
        codec.decode_get_response: b"".join(codec.encode_get_responses([(b"k" * 16, b"x" * 100, 1)], 1 << 20)),
        codec.decode_write_chunk: codec.encode_write_chunk(1, 0, b"x" * 100),
        codec.decode_put_request: codec.encode_put_request(b"f" * 16, [b"k" * 16], [b"x" * 100], [1]),
    }[decode]
    with pytest.raises(DecodeError):
        decode(whole[:-10])  # a length that runs past the end
    with pytest.raises(DecodeError):
        decode(b"\xff" * 11)  # a varint longer than 64 bits
    with pytest.raises(DecodeError):
        decode(bytes([(1 << 3) | 3]))  # a group: no KVStore message has one
