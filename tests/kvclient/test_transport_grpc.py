"""The inline gRPC data path (kvclient/transports/grpc_inline.py, kvstore/rpc_codec.py, kvwire/payload_codec.py)
against a real server: byte-exact round trips of every size on both put paths (one Put; Reserve -> Write stream ->
Commit), blocks larger than a Get message, and bad input answered with a clear status that loses nothing stored."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import xxhash

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError, ChecksumMismatchError, InvalidRequestError, TransferError
from kvclient.transports.grpc_inline import MESSAGE_BUDGET_BYTES, STREAM_BLOCK_BYTES
from kvstore.rpc_codec import GET_MESSAGE_BYTES
from kvwire import payload_codec
from kvwire.defaults import CLIENT_ID_METADATA, TENANT_METADATA
from kvwire.types import PutOutcome
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvclient.transport_util import eventually, random_blocks, tokens
from tests.serverproc import ServerProc

MIB = 1 << 20
ODD_SIZES = [1, 7, 4095, 4097, 65539, MIB - 1, MIB, MIB + 1, 3 * MIB + 5]


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory):
    srv = ServerProc(tmp_path_factory.mktemp("grpcpath") / "data",
                     flags={"host_memory": "256MiB", "ssd_capacity": "1GiB", "max_block_bytes": "8MiB", "lease_ttl_s": 30})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(grpc_server, fingerprint, request):
    with KVClient(grpc_server.address, fingerprint, tenant=f"t-{request.node.name}"[:60], transport="grpc") as c:
        assert c.stats()["client"]["transport"] == "grpc"
        yield c


def blocks_of(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert len(a) == len(b) and bytes(a) == bytes(b), f"block {i} ({len(b)} bytes) differs"


def test_every_size_round_trips_byte_exact_on_both_put_paths_at_once(client):
    assert 3 * MIB + 5 > GET_MESSAGE_BYTES  # the largest block spans several Get messages
    blocks = blocks_of(ODD_SIZES + [MIB] * 3)
    assert sum(len(b) for b in blocks if len(b) <= MIB) > MESSAGE_BUDGET_BYTES  # too much for one Put
    keys = client.block_keys(tokens(len(blocks)))
    assert client.put(keys, blocks) == [PutOutcome.STORED] * len(blocks)
    assert client.last_transfer.control_rpcs == 4  # the blocks under STREAM_BLOCK_BYTES in one Put; Reserve, Write, Commit
    assert_same(client.get(keys), blocks)
    outs = [np.zeros(len(b), np.uint8) for b in blocks]
    got = client.get(keys, out=outs)
    assert_same(outs, blocks)
    assert all(g.base is not None and np.shares_memory(g, o) for g, o in zip(got, outs))  # landed in the caller's buffers
    assert_same(client.get(keys[::-1]), blocks[::-1])  # in request order, whatever the order stored


def test_many_small_blocks_go_in_puts_of_a_message_budget_each(client):
    blocks = blocks_of([64 << 10] * 100 + [4097] * 3, seed=4)  # 6.3 MiB: two Puts
    assert all(len(b) < STREAM_BLOCK_BYTES for b in blocks)
    keys = client.block_keys(tokens(len(blocks), start=5_000))
    assert client.put(keys, blocks) == [PutOutcome.STORED] * len(blocks)
    assert client.last_transfer.control_rpcs == 2
    assert_same(client.get(keys), blocks)


def test_small_blocks_round_trip_byte_exact_in_one_put(client):
    blocks = blocks_of([1, 3, 4097, 65536, MIB], seed=1)
    keys = client.block_keys(tokens(len(blocks), start=10_000))
    assert client.put(keys, blocks) == [PutOutcome.STORED] * len(blocks)
    assert client.last_transfer.control_rpcs == 1  # one Put, payload inline
    outs = [bytearray(len(b)) for b in blocks]
    client.get(keys, out=outs)
    assert_same(outs, blocks)
    assert client.put(keys, blocks) == [PutOutcome.ALREADY_PRESENT] * len(blocks)


@pytest.mark.parametrize("extra_bytes", [0, 5 * MIB], ids=["one-put", "beside-a-streamed-block"])
def test_an_empty_block_is_refused_and_nothing_of_the_call_is_stored(client, extra_bytes):
    stored = client.block_keys(tokens(1, start=20_000 + extra_bytes))
    client.put(stored, blocks_of([999]))
    keys = client.block_keys(tokens(3, start=30_000 + extra_bytes))
    with pytest.raises(InvalidRequestError, match="non-empty"):
        client.put(keys, [np.ones(100, np.uint8), np.empty(0, np.uint8), np.ones(extra_bytes or 10, np.uint8)])
    assert client.contains(keys) == [False, False, False]
    assert_same(client.get(stored), blocks_of([999]))


def test_a_get_naming_a_missing_key_names_it_and_fills_nothing(client):
    blocks = blocks_of([MIB, 2 * MIB + 3], seed=2)
    present = client.block_keys(tokens(2, start=40_000))
    client.put(present, blocks)
    missing = client.block_keys(tokens(1, start=50_000))[0]
    outs = [np.full(len(blocks[0]), 7, np.uint8), np.full(len(blocks[1]), 7, np.uint8), np.full(10, 7, np.uint8)]
    with pytest.raises(BlockNotFoundError, match=missing.digest.hex()):
        client.get([present[0], missing, present[1]], out=[outs[0], outs[2], outs[1]])
    assert all((o == 7).all() for o in outs)  # never partial data
    assert_same(client.get(present), blocks)


def test_an_output_buffer_of_the_wrong_size_is_refused_clearly(client):
    keys = client.block_keys(tokens(2, start=60_000))
    blocks = blocks_of([MIB, 5], seed=3)
    client.put(keys, blocks)
    with pytest.raises(InvalidRequestError, match="holds 4 bytes; the block has 5"):
        client.get(keys, out=[np.zeros(MIB, np.uint8), np.zeros(4, np.uint8)])
    assert_same(client.get(keys), blocks)


# ---- raw calls: what another client could send ------------------------------------------------------


@pytest.fixture
def raw(grpc_server, fingerprint):
    channel = grpc.insecure_channel(grpc_server.address)
    metadata = ((CLIENT_ID_METADATA, "raw-writer"), (TENANT_METADATA, "raw"))
    yield pb_grpc.KVStoreStub(channel), channel, metadata, fingerprint.id
    channel.close()


def reserve(stub, metadata, fp: bytes, key: bytes, size: int) -> int:
    (lease,) = stub.Reserve(pb.ReserveRequest(fingerprint_id=fp, blocks=[pb.BlockSpec(key=key, size_bytes=size)]), metadata=metadata, timeout=10).leases
    assert lease.outcome == pb.LEASE_GRANTED
    return lease.lease_id


def commit(stub, metadata, fp: bytes, lease_id: int, data: bytes):
    return stub.Commit(pb.CommitRequest(fingerprint_id=fp, items=[pb.CommitItem(lease_id=lease_id, checksum=xxhash.xxh3_64_intdigest(data))]),
                       metadata=metadata, timeout=10)


def get_bytes(stub, metadata, fp: bytes, keys: list[bytes]) -> list[bytes]:
    """The blocks of a Get, put together from their pieces by protobuf's own messages (another client's view)."""
    out: list[bytearray] = []
    for response in stub.Get(pb.GetRequest(fingerprint_id=fp, keys=keys), metadata=metadata, timeout=10):
        for piece in response.pieces:
            if piece.offset == 0:
                out.append(bytearray())
            out[-1] += piece.data
    return [bytes(b) for b in out]


def failed(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_bad_write_streams_get_clear_statuses_and_lose_nothing_stored(raw):
    stub, channel, md, fp = raw
    kept, data = b"K" * 16, bytes(range(256)) * 12_000  # ~3 MiB: streamed in several chunks
    lid = reserve(stub, md, fp, kept, len(data))
    chunks = [payload_codec.encode_write_chunk(lid, off, data[off : off + MIB]) for off in range(0, len(data), MIB)]
    write = channel.stream_unary("/kvstore.v1.KVStore/Write", request_serializer=None, response_deserializer=pb.WriteSummary.FromString)
    assert write(iter(chunks), metadata=md, timeout=10).bytes_written == len(data)
    assert list(commit(stub, md, fp, lid, data).outcomes) == [pb.PUT_STORED]

    key, block = b"N" * 16, b"n" * 5000
    lid = reserve(stub, md, fp, key, len(block))
    err = failed(lambda: write(iter([b"\x0a\xff\xff"]), metadata=md, timeout=10))  # a length past the end
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in err.details()
    err = failed(lambda: write(iter([payload_codec.encode_write_chunk(lid, 4000, block[:1001])]), metadata=md, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the reserved 5000 bytes" in err.details()

    # a stream cut short by its sender: the call fails, the half-written lease commits nothing
    def cut_short():
        yield payload_codec.encode_write_chunk(lid, 0, block[:2500])
        raise RuntimeError("sender died")

    assert failed(lambda: write(cut_short(), metadata=md, timeout=10)).code() == grpc.StatusCode.UNKNOWN
    err = failed(lambda: commit(stub, md, fp, lid, block))
    assert err.code() == grpc.StatusCode.DATA_LOSS

    assert get_bytes(stub, md, fp, [kept]) == [data]
    lid = reserve(stub, md, fp, key, len(block))  # the refused commit released the lease: a retry starts afresh
    write(iter([payload_codec.encode_write_chunk(lid, 0, block)]), metadata=md, timeout=10)
    assert list(commit(stub, md, fp, lid, block).outcomes) == [pb.PUT_STORED]
    assert get_bytes(stub, md, fp, [key, kept]) == [block, data]


def test_a_malformed_put_is_refused_and_a_checksum_mismatch_stores_nothing(raw):
    stub, channel, md, fp = raw
    put = channel.unary_unary("/kvstore.v1.KVStore/Put", request_serializer=None, response_deserializer=pb.PutResponse.FromString)
    good = payload_codec.encode_put_request(fp, [b"P" * 16], [b"p" * 100], [xxhash.xxh3_64_intdigest(b"p" * 100)])
    err = failed(lambda: put(good[:-20], metadata=md, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in err.details()
    bad = payload_codec.encode_put_request(fp, [b"P" * 16, b"Q" * 16], [b"p" * 100, b"q" * 100], [xxhash.xxh3_64_intdigest(b"p" * 100), 1])
    assert failed(lambda: put(bad, metadata=md, timeout=10)).code() == grpc.StatusCode.DATA_LOSS
    present = stub.Lookup(pb.LookupRequest(fingerprint_id=fp, keys=[b"P" * 16, b"Q" * 16], present_only=True), metadata=md, timeout=10).present
    assert present == b"\x00\x00"
    assert list(put(good, metadata=md, timeout=10).outcomes) == [pb.PUT_STORED]
    assert get_bytes(stub, md, fp, [b"P" * 16]) == [b"p" * 100]


def test_a_get_abandoned_midway_drops_its_pins(grpc_server, client):
    keys = client.block_keys(tokens(8, start=70_000))
    client.put(keys, random_blocks(8, MIB))
    channel = grpc.insecure_channel(grpc_server.address)
    stub = pb_grpc.KVStoreStub(channel)
    md = ((CLIENT_ID_METADATA, "reader"), (TENANT_METADATA, client.tenant))
    responses = stub.Get(pb.GetRequest(fingerprint_id=client.fingerprint_id, keys=[k.digest for k in keys]), metadata=md, timeout=10)
    assert next(responses).pieces  # the first message came; the rest are never read
    responses.cancel()
    channel.close()
    # pinned blocks cannot be deleted until the reader lets go: once the server noticed, all of them can
    eventually(lambda: client.stats()["pins_held"] == 0, timeout_s=10)
    assert client.delete(keys) == 8


# ---- the client's landing of a Get stream, fed streams a broken or hostile server could send ------------------


def stream_of(blocks: list[tuple[bytes, bytes]], message_bytes: int = 4096) -> list[bytes]:
    return list(payload_codec.encode_get_responses([(k, d, xxhash.xxh3_64_intdigest(d)) for k, d in blocks], message_bytes))


def landed(messages: list[bytes], keys: list[bytes], outs=None) -> list:
    from kvclient.transports.base import TransferStats
    from kvclient.transports.grpc_inline import land

    results: list = [None] * len(keys)
    land(iter(messages), keys, outs, results, TransferStats())
    return results


def test_landing_a_whole_stream_fills_every_block_and_checks_it():
    blocks = [(b"a" * 16, b"x" * 10_000), (b"b" * 16, b""), (b"c" * 16, b"y" * 3)]
    outs = [bytearray(10_000), bytearray(0), bytearray(3)]
    got = landed(stream_of(blocks), [k for k, _ in blocks], outs)
    assert [bytes(g) for g in got] == [d for _, d in blocks] == [bytes(o) for o in outs]


@pytest.mark.parametrize("broken, error", [
    (lambda m: m[:-1], "ended 904 bytes short of block 6262"),  # the stream ends before the last block's last piece
    (lambda m: m[:-2], "returned 1 blocks for 2 keys"),  # ... before the last block
    (lambda m: m[:1] + m[2:], "out of order"),  # a piece of the first block lost
    (lambda m: m + m[-1:], "out of order|more than"),  # a piece sent twice
])
def test_a_truncated_or_scrambled_stream_is_a_transfer_error(broken, error):
    blocks = [(b"a" * 16, bytes(range(256)) * 32), (b"b" * 16, b"z" * 5000)]  # messages: a, a, b, b
    messages = stream_of(blocks)
    assert len(messages) >= 3
    with pytest.raises(TransferError, match=error):
        landed(broken(messages), [k for k, _ in blocks])


def test_a_stream_of_other_keys_or_extra_blocks_is_refused():
    with pytest.raises(TransferError, match="where 6262"):
        landed(stream_of([(b"a" * 16, b"x")]), [b"b" * 16])
    with pytest.raises(TransferError, match="more than the 1 blocks"):
        landed(stream_of([(b"a" * 16, b"x"), (b"b" * 16, b"y")]), [b"a" * 16])


def test_a_corrupted_piece_fails_the_blocks_checksum():
    messages = stream_of([(b"a" * 16, b"x" * 1000)])
    corrupted = messages[0][:-1] + b"!"
    with pytest.raises(ChecksumMismatchError, match=(b"a" * 16).hex()):
        landed([corrupted], [b"a" * 16])
