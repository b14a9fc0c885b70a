"""The Pin call's two protobuf messages as plain values: bytes in, columns out, no message objects.

A prefix Pin of an 8k-token prompt names 512 keys and is answered with three columns of 512 ints.
Through protobuf's message objects that costs ~45 us on each side of the call (building the
repeated fields, then reading them back into Python ints), more than the local socket's round
trip. kvwire._native (csrc/kvnative/pin_messages.c) writes and reads the same wire bytes directly;
the *_reference functions here go through the generated messages, define what the native ones
must give (tests/kvwire/test_native.py: byte for byte), and answer whatever those leave to them,
so a malformed message raises protobuf's own DecodeError.

Only the local control socket uses this (kvclient/local_control.py, kvstore/rpc_codec.py); gRPC
carries the same messages through its own serializers.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from kvwire.keys import PackedKeys
from kvwire.native import native
from kvwire.v1 import kvstore_pb2 as pb


class PinRequestFields(NamedTuple):
    """A PinRequest's fields, by the message's own names (the server's Pin handler reads either)."""

    fingerprint_id: bytes
    keys: Sequence[bytes]  # a list, or PackedKeys from the native decoder
    ttl_ms: int
    release_pin_ids: list[int]
    prefix_only: bool


class PinResponseFields(NamedTuple):
    pin_id: int
    expires_unix_ms: int
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    checksums: tuple[int, ...]
    # Only when some block has an HBM copy:
    tiers: tuple[int, ...] = ()
    hbm_offsets: tuple[int, ...] = ()
    hbm_pool_id: int = 0


class PinResponseColumns(NamedTuple):
    """A PinResponse for a client that reads its columns by index (kvclient's PinnedBlocks): decode_response's
    fields, the columns any sequences of ints, and the blocks' total bytes (the lengths' sum)."""

    pin_id: int
    expires_unix_ms: int
    offsets: Sequence[int]
    lengths: Sequence[int]
    checksums: Sequence[int]
    payload_bytes: int
    tiers: Sequence[int] = ()
    hbm_offsets: Sequence[int] = ()
    hbm_pool_id: int = 0


def encode_request(fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0, release_pin_ids: Sequence[int] = (),
                   prefix_only: bool = False) -> bytes:
    if native is not None:
        data = native.encode_pin_request(fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only)
        if data is not NotImplemented:
            return data
    return encode_request_reference(fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only)


def decode_request(payload: bytes | memoryview) -> PinRequestFields:
    if native is not None:
        fields = native.decode_pin_request(payload)
        if fields is not NotImplemented:
            fingerprint_id, keys, ttl_ms, release_pin_ids, prefix_only, key_width = fields
            return PinRequestFields(fingerprint_id, PackedKeys(keys, key_width) if key_width else keys, ttl_ms, release_pin_ids,
                                    prefix_only)
    return decode_request_reference(payload)


def encode_response(pin_id: int, expires_unix_ms: int, offsets: Sequence[int], lengths: Sequence[int], checksums: Sequence[int],
                    tiers: Sequence[int] = (), hbm_offsets: Sequence[int] = (), hbm_pool_id: int = 0) -> bytes:
    if native is not None:
        # With the HBM columns too: a server with the tier answers an engine's whole prefix with them, and through
        # protobuf's messages they cost a 512-block Pin ~0.5 ms on an H200 host.
        hbm = (tiers, hbm_offsets, hbm_pool_id) if len(tiers) or hbm_pool_id else ()
        data = native.encode_pin_response(pin_id, expires_unix_ms, offsets, lengths, checksums, *hbm)
        if data is not NotImplemented:
            return data
    return encode_response_reference(pin_id, expires_unix_ms, offsets, lengths, checksums, tiers, hbm_offsets, hbm_pool_id)


def decode_response(payload: bytes | memoryview) -> PinResponseFields:
    if native is not None:
        fields = native.decode_pin_response(payload)
        if fields is not NotImplemented:
            return PinResponseFields(*fields)  # no HBM columns: the native decoder leaves those answers to the reference
    return decode_response_reference(payload)


def decode_response_columns(payload: bytes | memoryview) -> PinResponseColumns:
    """decode_response's answer with the columns (the HBM ones too) as views of one array of uint64s where the
    native code reads it: no int object per value until one is read (a 512-block answer's 1,000 cost ~15 us to
    build). The same values as decode_response's, in any case (tests/kvwire/test_native.py)."""
    if native is not None:
        fields = native.decode_pin_columns(payload)
        if fields is not NotImplemented:
            pin_id, expires_unix_ms, cells, n, payload_bytes, hbm_columns, hbm_pool_id = fields
            values = memoryview(cells).cast("Q")
            tiers, hbm_offsets = (values[3 * n : 4 * n], values[4 * n :]) if hbm_columns else ((), ())
            return PinResponseColumns(pin_id, expires_unix_ms, values[:n], values[n : 2 * n], values[2 * n : 3 * n], payload_bytes,
                                      tiers, hbm_offsets, hbm_pool_id)
    return decode_response_columns_reference(payload)


def decode_response_columns_reference(payload: bytes | memoryview) -> PinResponseColumns:
    fields = decode_response(payload)
    return PinResponseColumns(fields.pin_id, fields.expires_unix_ms, fields.offsets, fields.lengths, fields.checksums,
                              sum(fields.lengths), fields.tiers, fields.hbm_offsets, fields.hbm_pool_id)


# ---- the references: protobuf's own messages --------------------------------------------------


def encode_request_reference(fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0, release_pin_ids: Sequence[int] = (),
                             prefix_only: bool = False) -> bytes:
    return pb.PinRequest(fingerprint_id=fingerprint_id, keys=keys, ttl_ms=ttl_ms, release_pin_ids=release_pin_ids,
                         prefix_only=prefix_only).SerializeToString()


def decode_request_reference(payload: bytes | memoryview) -> PinRequestFields:
    r = pb.PinRequest.FromString(payload)
    return PinRequestFields(r.fingerprint_id, list(r.keys), r.ttl_ms, list(r.release_pin_ids), r.prefix_only)


def encode_response_reference(pin_id: int, expires_unix_ms: int, offsets: Sequence[int], lengths: Sequence[int],
                              checksums: Sequence[int], tiers: Sequence[int] = (), hbm_offsets: Sequence[int] = (),
                              hbm_pool_id: int = 0) -> bytes:
    return pb.PinResponse(pin_id=pin_id, expires_unix_ms=expires_unix_ms, offsets=offsets, lengths=lengths,
                          checksums=checksums, tiers=tiers, hbm_offsets=hbm_offsets, hbm_pool_id=hbm_pool_id).SerializeToString()


def decode_response_reference(payload: bytes | memoryview) -> PinResponseFields:
    r = pb.PinResponse.FromString(payload)
    # [:] copies a packed column to a list in C, ~3x faster than iterating it (tuple(), zip) from Python
    return PinResponseFields(r.pin_id, r.expires_unix_ms, tuple(r.offsets[:]), tuple(r.lengths[:]), tuple(r.checksums[:]),
                             tuple(r.tiers[:]), tuple(r.hbm_offsets[:]), r.hbm_pool_id)
