"""kvwire._native against its Python references: the same keys, frames and Pin messages, byte for byte.

Each native function is called directly (so a silent fallback cannot pass for it) and through the
public function, on random and edge-case inputs; where it leaves an input to the reference
(NotImplemented), the public function must still answer as the reference does, errors included.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from kvclient.transports.base import SlotRef, slot_refs
from kvwire import local_wire, native as native_selection, pin_codec
from kvwire.keys import BlockKey, Fingerprint, PackedKeys, block_keys, block_keys_reference, chain_seed, native_keys
from kvwire.local_wire import FrameError
from kvwire.types import Tier
from kvwire.v1 import kvstore_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
native = native_selection.native
FP = Fingerprint("llama-3-8b", "abc123", 32, 8, 128, 16, "bfloat16")
FINGERPRINTS = [
    FP,
    Fingerprint("m", "r", 2, 2, 64, 1, "float16"),
    Fingerprint("m", "r", 2, 2, 64, 64, "float16", tp_rank=1, tp_size=2, extras={"lora": "x"}),
]
TENANTS = [None, "", "acme", "テナント"]


@pytest.fixture(autouse=True, scope="module")
def compiled():
    """The extension must be built (setup.py builds it with every install); without it every comparison
    here would hold the reference against itself."""
    if native_selection.disabled():
        pytest.skip(f"the native code is off here ({native_selection.status})")
    assert native is not None, f"kvwire._native is not in use: {native_selection.status}; run `pip install -e .` (or make install)"


def random_tokens(rng: random.Random, n: int, high: int = 128_000) -> list[int]:
    return [rng.randrange(high) for _ in range(n)]


# ---- block keys -----------------------------------------------------------------------


@pytest.mark.parametrize("fingerprint", FINGERPRINTS, ids=["llama-bt16", "bt1", "bt64-tp1-extras"])
@pytest.mark.parametrize("tenant", TENANTS)
def test_keys_equal_the_reference_for_random_prompts(fingerprint, tenant):
    rng = random.Random(f"{fingerprint.id_hex}/{tenant}")
    n = fingerprint.block_tokens
    for length in (0, 1, n - 1, n, n + 1, 2 * n, 3 * n + 5, rng.randrange(1, 40 * n), 8192):
        tokens = random_tokens(rng, length)
        expected = block_keys_reference(fingerprint, tokens, tenant)
        direct = native.chain_keys(chain_seed(fingerprint, tenant), tokens, n, None, BlockKey)
        assert direct == expected and len(direct) == length // n
        assert all(type(k) is BlockKey and len(k.digest) == 16 for k in direct)
        assert block_keys(fingerprint, tokens, tenant) == expected
        assert block_keys(fingerprint, tuple(tokens), tenant) == expected
        assert block_keys(fingerprint, np.array(tokens, dtype=np.int64), tenant) == expected
        assert block_keys(fingerprint, np.array(tokens, dtype=np.int32), tenant) == expected


def test_keys_of_the_golden_vectors_and_of_extreme_token_ids():
    assert [k.hex() for k in block_keys(FP, list(range(40)), tenant="acme")] == [
        "e8023ec51132bcbcd1b9c6e693cb003d", "4e388a377c241d4a9e9e1adc92aef2a7"]  # tests/kvwire/test_keys.py's
    extremes = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63), 2**30, -(2**30) - 1, 128_255, 2**40 + 7]
    tokens = (extremes * 3)[:32]
    expected = block_keys_reference(FP, tokens, "acme")
    assert native.chain_keys(chain_seed(FP, "acme"), tokens, 16, None, BlockKey) == expected
    assert block_keys(FP, np.array(tokens, dtype="<i8"), "acme") == expected


def test_keys_with_extra_keys_per_block():
    rng = random.Random(7)
    tokens = random_tokens(rng, 16 * 5 + 3)
    for extras in ([b""] * 5, [b"lora-1"] * 5, [bytes([i]) * (i * 40) for i in range(5)], [b"x"] * 9):
        expected = block_keys_reference(FP, tokens, "t", extras)
        assert native.chain_keys(chain_seed(FP, "t"), tokens, 16, extras, BlockKey) == expected
        assert block_keys(FP, tokens, "t", iter(extras)) == expected  # any iterable, consumed once
    with pytest.raises(ValueError, match="extra_keys has 4 entries for 5 full blocks"):
        block_keys(FP, tokens, extra_keys=[b""] * 4)


def test_inputs_the_native_code_leaves_to_numpy_give_the_reference_answer():
    seed = chain_seed(FP, None)
    leave = {
        "bools": [True, False] * 16,
        "numpy scalars": [np.int64(i) for i in range(32)],
        "floats": [float(i) + 0.5 for i in range(32)],
        "past int64": list(range(31)) + [2**63],
        "bad token in the partial tail": list(range(32)) + [2**64],
        "strided array": np.arange(64, dtype=np.int64)[::2],
        "2-d array": np.arange(32, dtype=np.int64).reshape(2, 16),
        "a range": range(32),
    }
    for name, tokens in leave.items():
        assert native.chain_keys(seed, tokens, 16, None, BlockKey) is NotImplemented, name
        try:
            expected = block_keys_reference(FP, tokens)
        except Exception as err:  # noqa: BLE001 - the reference's own error is the answer
            with pytest.raises(type(err)):
                block_keys(FP, tokens)
        else:
            assert block_keys(FP, tokens) == expected, name
    assert native.chain_keys(seed, list(range(32)), 16, [b"", "str"], BlockKey) is NotImplemented
    with pytest.raises(TypeError):
        block_keys(FP, list(range(32)), extra_keys=[b"", "str"])


# ---- local socket frames ------------------------------------------------------------------

METADATA = [
    (),
    (("kvstore-client-id", "host:1:abc"), ("kvstore-tenant", "acme"), ("authorization", "Bearer t0k")),
    (("x-trace-bin", b"\x00\xff\x10"), ("k", ""), ("ünï", "cödé ✓")),
]


@pytest.mark.parametrize("metadata", METADATA)
@pytest.mark.parametrize("timeout_s", [None, 0.0, 2.5, 30])
def test_request_frames_equal_the_reference(metadata, timeout_s):
    for payload in (b"", os.urandom(9000), bytearray(b"abc"), memoryview(b"xyz")):
        frame = local_wire.encode_request("/kvstore.v1.KVStore/Pin", timeout_s, metadata, payload)
        assert frame == local_wire.encode_request_reference("/kvstore.v1.KVStore/Pin", timeout_s, metadata, payload)
        assert native.encode_request("/kvstore.v1.KVStore/Pin", timeout_s, metadata, payload, local_wire.MAX_FRAME_BYTES) == frame
        body = memoryview(frame)[4:]
        assert native.decode_request(body) is not NotImplemented
        got, want = local_wire.decode_request(body), local_wire.decode_request_reference(body)
        assert got[:3] == want[:3] and bytes(got.payload) == bytes(want.payload) == bytes(payload)


@pytest.mark.parametrize("metadata", METADATA)
def test_response_frames_equal_the_reference(metadata):
    for code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        for details, payload in (("", b""), ("the ünïcode détail", os.urandom(300))):
            frame = local_wire.encode_response(code, details, metadata, payload)
            assert frame == local_wire.encode_response_reference(code, details, metadata, payload)
            body = memoryview(frame)[4:]
            assert native.decode_response(body) is not NotImplemented
            got, want = local_wire.decode_response(body), local_wire.decode_response_reference(body)
            assert got[:3] == want[:3] and bytes(got.payload) == bytes(want.payload)


def outcome(decode, body):
    try:
        r = decode(body)
    except FrameError:
        return "FrameError"
    return (*r[:-1], bytes(r[-1]))


def test_mangled_frames_decode_as_the_reference_decodes_them():
    """Truncated, extended and bit-flipped bodies: the same fields or the same FrameError (the
    reference even accepts a last metadata value cut short; the native parse leaves that to it)."""
    rng = random.Random(13)
    request = local_wire.encode_request("/kvstore.v1.KVStore/Lookup", 1.0, METADATA[2], b"payload")[4:]
    response = local_wire.encode_response(grpc.StatusCode.OK, "détail", METADATA[2], b"payload")[4:]
    for body, native_decode, decode, reference in ((request, native.decode_request, local_wire.decode_request, local_wire.decode_request_reference),
                                                   (response, native.decode_response, local_wire.decode_response, local_wire.decode_response_reference)):
        variants = [body[:cut] for cut in range(len(body))] + [body + b"\x00\x01"]
        for _ in range(400):
            mangled = bytearray(body)
            for _ in range(rng.randrange(1, 4)):
                mangled[rng.randrange(len(mangled))] = rng.randrange(256)
            variants.append(bytes(mangled))
        for variant in variants:
            assert outcome(decode, memoryview(variant)) == outcome(reference, memoryview(variant))
        assert native_decode(body[:3]) is NotImplemented


def test_frames_the_native_code_leaves_to_the_reference():
    too_big = b"\x00" * (local_wire.MAX_FRAME_BYTES + 1)
    assert native.encode_request("/m", None, (), too_big, local_wire.MAX_FRAME_BYTES) is NotImplemented
    with pytest.raises(FrameError, match="over the"):
        local_wire.encode_request("/m", None, (), too_big)
    assert native.encode_request("/m", None, [["k", "v"]], b"", local_wire.MAX_FRAME_BYTES) is NotImplemented  # a list pair
    assert local_wire.encode_request("/m", None, [["k", "v"]], b"") == local_wire.encode_request_reference("/m", None, [("k", "v")], b"")
    assert native.encode_request("/m", None, (("k", 7),), b"", local_wire.MAX_FRAME_BYTES) is NotImplemented  # str(7)
    assert local_wire.encode_request("/m", None, (("k", 7),), b"") == local_wire.encode_request_reference("/m", None, (("k", "7"),), b"")
    generator = (pair for pair in METADATA[1])
    assert local_wire.encode_request("/m", 1.0, generator, b"") == local_wire.encode_request_reference("/m", 1.0, METADATA[1], b"")
    unknown_code = bytes([99]) + local_wire.encode_response(grpc.StatusCode.OK, "", (), b"")[5:]
    with pytest.raises(FrameError):
        local_wire.decode_response(memoryview(unknown_code))


# ---- the Pin call's messages ------------------------------------------------------------------


def pin_requests(rng: random.Random):
    yield b"", [], 0, [], False
    yield os.urandom(16), [os.urandom(16)], 0, [], True
    yield os.urandom(16), [os.urandom(16) for _ in range(512)], 30_000, [rng.getrandbits(62)], True
    yield os.urandom(16), [b"", os.urandom(3), os.urandom(200)], 2**32 - 1, [0, 1, 2**64 - 1, 127, 128], False
    for _ in range(20):
        yield (os.urandom(rng.randrange(0, 40)), [os.urandom(rng.randrange(0, 20)) for _ in range(rng.randrange(0, 30))],
               rng.choice([0, rng.getrandbits(32)]), [rng.getrandbits(64) for _ in range(rng.randrange(0, 5))], rng.random() < 0.5)


def pin_responses(rng: random.Random):
    yield 0, 0, [], [], []
    yield 1, -5, [0], [1], [2**64 - 1]
    n = 512
    yield (rng.getrandbits(62), 1_780_000_000_000, [i * 8192 for i in range(n)], [4096] * n, [rng.getrandbits(64) for _ in range(n)])
    for _ in range(20):
        n = rng.randrange(0, 40)
        yield (rng.getrandbits(64), rng.randrange(-(2**63), 2**63), [rng.getrandbits(rng.choice([7, 20, 40, 64])) for _ in range(n)],
               [rng.choice([4096, 1 << 20, rng.getrandbits(30)]) for _ in range(n)], [rng.getrandbits(64) for _ in range(n)])


def test_pin_requests_equal_protobufs_bytes_and_parse():
    for fields in pin_requests(random.Random(1)):
        data = pin_codec.encode_request(*fields)
        assert data == pin_codec.encode_request_reference(*fields) == native.encode_pin_request(*fields)
        assert native.decode_pin_request(data) is not NotImplemented
        assert pin_codec.decode_request(data) == pin_codec.decode_request_reference(data) == fields[:3] + (list(fields[3]), fields[4])
        keys = pin_codec.decode_request(data).keys  # keys of one width (not empty): one bytes object; else a list
        uniform = len({len(k) for k in fields[1]}) == 1 and len(fields[1][0]) > 0
        assert type(keys) is (PackedKeys if uniform else list) and list(keys) == fields[1]
        if uniform:
            assert keys.packed == b"".join(fields[1]) and keys.width == len(fields[1][0])


def test_packed_keys_read_as_the_list_of_their_keys():
    keys = [os.urandom(16) for _ in range(5)]
    packed = PackedKeys(b"".join(keys), 16)
    assert len(packed) == 5 and list(packed) == keys and packed == keys and keys == packed
    assert [packed[i] for i in range(-5, 5)] == keys + keys and packed[1:4] == keys[1:4] and packed[::-2] == keys[::-2]
    assert packed.index(keys[3]) == 3 and keys[2] in packed and os.urandom(16) not in packed
    assert packed == PackedKeys(b"".join(keys), 16) and packed != keys[:4] and packed != PackedKeys(b"".join(keys[:4]), 16)
    for i in (5, -6):
        with pytest.raises(IndexError):
            packed[i]
    with pytest.raises(ValueError):
        PackedKeys(b"x" * 17, 16)
    with pytest.raises(ValueError):
        PackedKeys(b"", 0)
    assert native_keys(packed) == b"".join(keys) and native_keys(PackedKeys(b"".join(keys), 8)) == [k for key in keys for k in (key[:8], key[8:])]
    assert native_keys(tuple(keys)) == keys and native_keys(keys) is keys


def hbm_pin_responses(rng: random.Random):
    """Pin answers of a server with an HBM tier: each block's fastest tier, its HBM offset (0 where none), the pool."""
    yield 7, 1234, [0, 4096], [4096, 4096], [11, 22], [Tier.HBM.value, Tier.HOST.value], [8192, 0], 3
    n = 512
    yield (rng.getrandbits(62), 1_780_000_000_000, [i * 8192 for i in range(n)], [4096] * n, [rng.getrandbits(64) for _ in range(n)],
           [Tier.HBM.value] * n, [i * 4096 for i in range(n)], rng.getrandbits(63))
    for _ in range(20):
        n = rng.randrange(1, 40)
        tiers = [rng.choice([Tier.HBM.value, Tier.HOST.value]) for _ in range(n)]
        yield (rng.getrandbits(64), rng.randrange(-(2**63), 2**63), [rng.getrandbits(40) for _ in range(n)], [4096] * n,
               [rng.getrandbits(64) for _ in range(n)], tiers, [rng.getrandbits(36) if t == Tier.HBM.value else 0 for t in tiers],
               rng.choice([0, rng.getrandbits(64)]))


def test_pin_responses_equal_protobufs_bytes_and_parse():
    for fields in pin_responses(random.Random(2)):
        data = pin_codec.encode_response(*fields)
        assert data == pin_codec.encode_response_reference(*fields) == native.encode_pin_response(*fields)
        assert native.decode_pin_response(data) is not NotImplemented
        got = pin_codec.decode_response(data)
        assert got == pin_codec.decode_response_reference(data) == fields[:2] + tuple(tuple(c) for c in fields[2:]) + ((), (), 0)


def test_pin_responses_with_hbm_columns_equal_protobufs_bytes():
    """The HBM columns are written natively too, byte for byte as protobuf writes them, and read back as columns."""
    for fields in hbm_pin_responses(random.Random(3)):
        data = pin_codec.encode_response(*fields)
        assert data == pin_codec.encode_response_reference(*fields) == native.encode_pin_response(*fields)
        got = pin_codec.decode_response_columns(data)
        assert native.decode_pin_columns(data) is not NotImplemented
        assert (tuple(got.tiers), tuple(got.hbm_offsets), got.hbm_pool_id) == (tuple(fields[5]), tuple(fields[6]), fields[7])
        assert as_values(got) == as_values(pin_codec.decode_response_columns_reference(data))


def test_pin_response_columns_may_be_packed_uint64_arrays():
    """The server's prefix walk hands the encoder its columns as array('Q')s (kvstore block_table.pin_prefix, packed):
    the same bytes as from lists, natively; a numpy uint64 array too; signed or narrower arrays go to the reference,
    which writes the same bytes or refuses alike."""
    import array

    import numpy as np

    for fields in list(pin_responses(random.Random(5))) + list(hbm_pin_responses(random.Random(6))):
        want = pin_codec.encode_response_reference(*fields)
        packed = fields[:2] + tuple(array.array("Q", c) for c in fields[2:7]) + fields[7:]
        assert native.encode_pin_response(*packed) == want
        as_numpy = fields[:2] + tuple(np.asarray(c, dtype=np.uint64) for c in fields[2:7]) + fields[7:]
        assert pin_codec.encode_response(*as_numpy) == want
    fields = (1, 0, array.array("q", [1, 2]), array.array("I", [3, 4]), [5, 6])
    assert native.encode_pin_response(*fields) is NotImplemented and pin_codec.encode_response(*fields) == \
        pin_codec.encode_response_reference(1, 0, [1, 2], [3, 4], [5, 6])
    with pytest.raises(ValueError):
        pin_codec.encode_response(1, 0, array.array("q", [-1]), [0], [0])


def as_values(columns: pin_codec.PinResponseColumns) -> tuple:
    return tuple(tuple(v) if not isinstance(v, int) else v for v in columns)


def test_pin_response_columns_are_decode_responses_values():
    """decode_response_columns (arrays where native) reads what decode_response reads, and the lengths' sum;
    for anything it is not given natively (columns of unequal length, a column split in two), the reference's answer."""
    rng = random.Random(6)
    cases = [pin_codec.encode_response(*fields) for fields in pin_responses(random.Random(2))]
    cases += [pin_codec.encode_response(7, 1234, [0, 4096], [4096, 4096], [11, 22], [Tier.HBM.value, Tier.HOST.value], [8192, 0], 3),
              pin_codec.encode_response(7, 1234, [0, 4096], [4096, 4096], [11, 22], [Tier.HBM.value], [8192], 3),  # one tier for two
              b"\x22\x02\x05\x06" + b"\x2a\x01\x01" + b"\x32\x02\x07\x08",  # two offsets, one length
              b"\x22\x01\x05" + b"\x22\x01\x06"]  # offsets split over two fields
    natively = 0
    for data in cases:
        want = pin_codec.decode_response_columns_reference(data)
        assert want[:5] + want[6:] == tuple(pin_codec.decode_response_reference(data)) and want.payload_bytes == sum(want.lengths)
        natively += native.decode_pin_columns(data) is not NotImplemented
        got = pin_codec.decode_response_columns(data)
        assert as_values(got) == as_values(want)
        assert [got.offsets[i] for i in range(len(got.offsets))] == list(want.offsets)  # each value an int, by index too
        assert all(type(v) is int for v in got.checksums)
    assert natively == len(cases) - 3
    for _ in range(500):  # corrupted answers: the reference's values or its error
        data = bytearray(rng.choice(cases[:24]))
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            want = pin_codec.decode_response_columns_reference(bytes(data))
        except DecodeError:
            with pytest.raises(DecodeError):
                pin_codec.decode_response_columns(bytes(data))
        else:
            assert as_values(pin_codec.decode_response_columns(bytes(data))) == as_values(want)


def test_pin_responses_with_hbm_placements_keep_their_tier_columns():
    """A Pin naming HBM copies keeps its columns through either codec, native or not."""
    fields = (7, 1234, [0, 4096], [4096, 4096], [11, 22], [Tier.HBM.value, Tier.HOST.value], [8192, 0], 3)
    data = pin_codec.encode_response(*fields)
    assert data == pin_codec.encode_response_reference(*fields)
    got = pin_codec.decode_response(data)
    assert got.tiers == (Tier.HBM.value, Tier.HOST.value) and got.hbm_offsets == (8192, 0) and got.hbm_pool_id == 3
    assert got == pin_codec.decode_response_reference(data)


def test_pin_messages_any_protobuf_writer_may_send_parse_as_protobuf_parses_them():
    """Fields out of order, a singular field twice, unpacked repeated ints, unknown fields, a column split in two:
    legal protobuf that our encoders never write. Native or not, the answer is protobuf's."""
    key = os.urandom(16)
    requests = [
        b"\x28\x01" + b"\x12\x10" + key + b"\x0a\x02ab" + b"\x0a\x02cd",  # prefix_only first; fingerprint_id twice
        b"\x20\x05\x20\x07" + b"\x22\x01\x09",  # release ids unpacked, then packed
        b"\x18\x80\x80\x80\x80\x10",  # ttl_ms beyond uint32
        b"\x28\x02",  # a bool written as 2
        b"\x3a\x00",  # an unknown field
    ]
    for data in requests:
        assert pin_codec.decode_request(data) == pin_codec.decode_request_reference(data)
    responses = [
        b"\x22\x01\x05" + b"\x22\x01\x06",  # offsets split over two fields
        b"\x20\x05" + b"\x08\x01" + b"\x08\x02",  # an unpacked offset; pin_id twice
        b"\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a negative expiry
        b"\x10\x01",  # the unused field 2
    ]
    for data in responses:
        assert pin_codec.decode_response(data) == pin_codec.decode_response_reference(data)


def test_random_bytes_as_pin_messages_give_protobufs_answer_or_its_error():
    rng = random.Random(5)
    valid = [pin_codec.encode_request(*f) for f in pin_requests(random.Random(3))]
    valid_r = [pin_codec.encode_response(*f) for f in pin_responses(random.Random(4))]
    for decode, reference, corpus in ((pin_codec.decode_request, pin_codec.decode_request_reference, valid),
                                      (pin_codec.decode_response, pin_codec.decode_response_reference, valid_r)):
        for _ in range(1500):
            data = bytearray(rng.choice(corpus))
            if data and rng.random() < 0.7:
                for _ in range(rng.randrange(1, 3)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                data = bytearray(os.urandom(rng.randrange(0, 30)))
            data = bytes(data[: rng.randrange(len(data) + 1)]) if rng.random() < 0.3 else bytes(data)
            try:
                want = reference(data)
            except DecodeError:
                with pytest.raises(DecodeError):
                    decode(data)
            else:
                assert decode(data) == want


def test_pin_values_protobuf_refuses_are_refused_alike():
    for fields in ((b"", [], -1, [], False), (b"", [], 2**32, [], False), (b"", [], 0, [-1], False), (b"", ["str"], 0, [], False)):
        assert native.encode_pin_request(*fields) is NotImplemented
        with pytest.raises((ValueError, TypeError)):
            pin_codec.encode_request(*fields)
    assert native.encode_pin_response(1, 0, [-1], [0], [0]) is NotImplemented
    with pytest.raises(ValueError):
        pin_codec.encode_response(1, 0, [-1], [0], [0])
    assert pb.PinResponse.FromString(pin_codec.encode_response(0, 0, (1, 2), [3, 4], [5, 6])).offsets == [1, 2]  # any sequence


def test_slot_rows_equal_the_namedtuple_reference():
    rng = random.Random(9)
    for n in (0, 1, 512):
        offsets, sizes = tuple(rng.getrandbits(40) for _ in range(n)), tuple(rng.choice([4096, 65536]) for _ in range(n))
        checksums = tuple(rng.getrandbits(64) for _ in range(n))
        rows = native.slot_rows(SlotRef, 7, offsets, sizes, 2**61, checksums, 1_780_000_000_000)
        reference = [SlotRef(7 + i, offsets[i], sizes[i], 2**61, checksums[i], 1_780_000_000_000) for i in range(n)]
        assert rows == reference and all(type(r) is SlotRef for r in rows)
        assert [r.offset for r in rows] == list(offsets) and (not rows or rows[-1].index == 6 + n)
        assert slot_refs(7, list(offsets), sizes, 2**61, checksums, 1_780_000_000_000) == reference  # a list: left to the reference
    assert native.slot_rows(tuple, 0, (1,), (2,), 3, (4,), 5) == [(0, 1, 2, 3, 4, 5)]


# ---- choosing ----------------------------------------------------------------------------------


def test_the_env_var_forces_the_references_and_they_agree_across_processes():
    """KVSTORE_NATIVE=0 in a fresh process: no native code loaded, and the keys and frames it computes
    are this process's native ones."""
    script = (
        "import json, sys\n"
        "from kvwire import native, local_wire\n"
        "from kvwire.keys import Fingerprint, block_keys\n"
        "import kvstore.block_table as table\n"
        "fp = Fingerprint('llama-3-8b', 'abc123', 32, 8, 128, 16, 'bfloat16')\n"
        "keys = [k.hex() for k in block_keys(fp, list(range(1000, 9192)), 'acme')]\n"
        "frame = local_wire.encode_request('/kvstore.v1.KVStore/Pin', 2.5, (('a', 'b'), ('c-bin', b'd')), b'xyz').hex()\n"
        "print(json.dumps([native.native is None, native.status, table.pin_table is None, keys, frame]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), native_selection.NATIVE_ENV: "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True)
    import json

    off, status, table_off, keys, frame = json.loads(out.stdout)
    assert off and table_off and status.startswith("off")
    assert keys == [k.hex() for k in block_keys(FP, list(range(1000, 9192)), "acme")]
    assert frame == local_wire.encode_request("/kvstore.v1.KVStore/Pin", 2.5, (("a", "b"), ("c-bin", b"d")), b"xyz").hex()
    assert "not built" not in out.stderr  # off by choice: no warning


def test_poll_readable_waits_out_its_spin_on_a_quiet_socket_and_returns_at_once_on_data_or_hangup():
    import socket
    import time

    a, b = socket.socketpair()
    with a, b:
        t0 = time.perf_counter()
        assert native.poll_readable(a.fileno(), 20_000_000) is False
        assert time.perf_counter() - t0 >= 0.019
        b.send(b"x")
        t0 = time.perf_counter()
        assert native.poll_readable(a.fileno(), 5_000_000_000) is True
        assert time.perf_counter() - t0 < 1.0
        a.recv(1)
        b.close()
        assert native.poll_readable(a.fileno(), 5_000_000_000) is True  # a hangup: the caller's recv sees it
    with pytest.raises(TypeError):
        native.poll_readable(3)
