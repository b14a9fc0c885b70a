"""KVClient's call sequences and pins, in process: a control channel and a data mover over one in-memory pool.

What runs once in the client for every transport: put is Reserve -> write -> Commit and releases its leases when
the write fails; get is Pin -> read, its pin dropped by the next Pin, at once when the read fails, and halved when
the pool cannot stage the batch; pin() pins all or a prefix, releases on leaving its block and verifies in the pool.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import xxhash

import kvclient.client
from kvclient import KVClient, SlotRef, TransferStats
from kvclient.connect import Connection, TransportChoice
from kvclient.control import PinGrant, Reservation
from kvclient.errors import BlockNotFoundError, CapacityExhaustedError, ChecksumMismatchError, TransferError
from kvclient.integrity import check_block
from kvclient.transports.base import Transport
from kvwire.types import LeaseOutcome, PutOutcome
from tests.conftest import make_fingerprint

BLOCK = 4096


class MemoryControl:
    """The control calls KVClient makes, over a dict and a pool in this process; records each call's name."""

    path = "memory"

    def __init__(self, slots: int = 64) -> None:
        self.pool = np.zeros(slots * BLOCK, np.uint8)
        self.free = list(range(slots))
        self.blocks: dict[bytes, tuple[int, int, int]] = {}  # key -> offset, size, checksum
        self.leases: dict[int, tuple[bytes, int, int]] = {}  # lease id -> key, offset, size
        self.pins: dict[int, list[bytes]] = {}
        self.max_pin_keys = 1 << 30  # a Pin of more keys is refused as more than the pool can stage
        self.calls: list[str] = []
        self.carried: list[list[int]] = []  # release_pin_ids of each Pin
        self._ids = itertools.count(1)

    def reserve(self, fingerprint_id, keys, sizes, durable=False, ttl_ms=0, timeout_s=None):
        self.calls.append("reserve")
        rows = []
        for key, size in zip(keys, sizes):
            if key in self.blocks:
                rows.append((LeaseOutcome.ALREADY_PRESENT, 0, 0, 0, 0))
                continue
            lease_id, offset = next(self._ids), self.free.pop(0) * BLOCK
            self.leases[lease_id] = (key, offset, size)
            rows.append((LeaseOutcome.GRANTED, lease_id, offset, size, 2**62))
        return Reservation(rows)

    def commit(self, fingerprint_id, lease_ids, checksums, durable=False, timeout_s=None):
        self.calls.append("commit")
        for lease_id, checksum in zip(lease_ids, checksums):
            key, offset, size = self.leases.pop(lease_id)
            check_block(key, self.pool[offset: offset + size], checksum)
            self.blocks[key] = (offset, size, checksum)
        return [PutOutcome.STORED] * len(lease_ids)

    def release(self, lease_ids, timeout_s=None):
        self.calls.append("release")
        return sum(self.leases.pop(i, None) is not None for i in lease_ids)

    def pin(self, fingerprint_id, keys, release_pin_ids=(), prefix_only=False, ttl_ms=0, timeout_s=None):
        self.calls.append("pin")
        self.carried.append(list(release_pin_ids))
        self.unpin(release_pin_ids, record=False)
        present = [k in self.blocks for k in keys]
        if not prefix_only and not all(present):
            raise BlockNotFoundError(f"{present.count(False)} of {len(keys)} blocks not found")
        keys = keys[: present.index(False)] if False in present else keys
        if len(keys) > self.max_pin_keys:
            raise CapacityExhaustedError("host pool cannot stage this many blocks")
        if not keys:
            return PinGrant(0, 0, (), (), ())
        pin_id = next(self._ids)
        self.pins[pin_id] = list(keys)
        meta = [self.blocks[k] for k in keys]
        return PinGrant(pin_id, 2**62, *zip(*meta))

    def unpin(self, pin_ids, timeout_s=None, record=True):
        if record:
            self.calls.append("unpin")
        return sum(self.pins.pop(i, None) is not None for i in pin_ids)

    def close(self) -> None:
        pass


class PoolMover(Transport):
    """A data mover over MemoryControl's pool, as shm moves bytes over the server's."""

    name = "memory"

    def __init__(self, control: MemoryControl) -> None:
        self.control = control
        self.fail_writes = False

    def pool_view(self):
        return self.control.pool

    def write(self, keys, slots, payloads, stats):
        if self.fail_writes:
            raise TransferError("write failed midway")
        for s in slots:
            self.control.pool[s.offset: s.offset + s.size_bytes] = np.frombuffer(payloads[s.index], np.uint8)

    def read(self, keys, slots, dests, stats, ahead=None):
        for s, dest in zip(slots, dests):
            np.copyto(dest, self.control.pool[s.offset: s.offset + s.size_bytes])
            check_block(keys[s.index], dest, s.checksum)


@pytest.fixture
def store(monkeypatch):
    control = MemoryControl()
    mover = PoolMover(control)
    connection = Connection(control, control, mover, TransportChoice("auto", "memory"))
    monkeypatch.setattr(kvclient.client, "connect", lambda *args: connection)
    client = KVClient("memory:0", make_fingerprint(), tenant="t")
    client._unpins._idle_s = 3600  # only the next Pin (or close) drops a deferred pin here
    yield client, control, mover
    client.close()


def blocks(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, BLOCK, dtype=np.uint8) for _ in range(n)]


def test_put_reserves_writes_and_commits_once_for_the_batch(store):
    client, control, _ = store
    keys, data = client.block_keys(range(16 * 3)), blocks(3)
    assert client.put(keys, data) == [PutOutcome.STORED] * 3
    assert control.calls == ["reserve", "commit"] and client.last_transfer.control_rpcs == 2
    assert client.last_transfer.bytes == 3 * BLOCK and client.last_transfer.blocks == 3
    control.calls.clear()
    assert client.put(keys[:2], data[:2]) == [PutOutcome.ALREADY_PRESENT] * 2
    assert control.calls == ["reserve"]  # nothing granted: nothing to write or commit


def test_a_failed_write_releases_the_leases_and_commits_nothing(store):
    client, control, mover = store
    keys = client.block_keys(range(16 * 2))
    mover.fail_writes = True
    with pytest.raises(TransferError, match="midway"):
        client.put(keys, blocks(2))
    assert control.calls == ["reserve", "release"] and not control.leases and not control.blocks


def test_a_get_pins_once_and_its_pin_rides_on_the_next_pin(store):
    client, control, _ = store
    keys, data = client.block_keys(range(16 * 4)), blocks(4)
    client.put(keys, data)
    control.calls.clear()
    got = client.get(keys)
    assert all(np.array_equal(a, b) for a, b in zip(got, data))
    assert control.calls == ["pin"] and client.last_transfer.control_rpcs == 1 and len(control.pins) == 1
    first = next(iter(control.pins))
    client.get(keys[:2])
    assert control.carried[-1] == [first] and len(control.pins) == 1  # dropped by the second Pin itself
    assert control.calls == ["pin", "pin"]


def test_a_failed_read_drops_its_pin_at_once(store):
    client, control, _ = store
    keys = client.block_keys(range(16 * 2))
    client.put(keys, blocks(2))
    offset = control.blocks[keys[1].digest][0]
    control.pool[offset + 9] ^= 0xFF
    with pytest.raises(ChecksumMismatchError, match=keys[1].hex()):
        client.get(keys)
    assert control.calls[-2:] == ["pin", "unpin"] and not control.pins


def test_a_get_larger_than_the_pool_can_stage_is_pinned_in_halves(store):
    client, control, _ = store
    keys, data = client.block_keys(range(16 * 5)), blocks(5)
    client.put(keys, data)
    control.max_pin_keys = 2
    outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
    client.get(keys, out=outs)
    assert all(np.array_equal(a, b) for a, b in zip(outs, data))
    assert client.last_transfer.blocks == 5 and client.last_transfer.bytes == 5 * BLOCK


def test_pin_is_all_or_nothing_or_the_leading_run(store):
    client, control, _ = store
    keys, data = client.block_keys(range(16 * 4)), blocks(4)
    client.put(keys[:2] + keys[3:], data[:2] + data[3:])  # block 2 missing
    with pytest.raises(BlockNotFoundError):
        client.pin(keys)
    assert not control.pins
    with client.pin(keys, prefix=True) as pinned:
        assert len(pinned) == 2 and pinned.keys == [k.digest for k in keys[:2]]
        assert [s.index for s in pinned.slots] == [0, 1] and client.last_transfer is pinned.stats
        assert pinned.stats.control_rpcs == 1 and pinned.stats.blocks == 2 and pinned.stats.bytes == 2 * BLOCK
        for i in range(2):
            pinned.verify(i)
            assert np.array_equal(pinned.block(i), data[i])
        assert list(control.pins.values()) == [[k.digest for k in keys[:2]]]
    with client.pin(keys[2:], prefix=True) as none:
        assert len(none) == 0 and none.pin_id == 0
    assert client.pin([]).slots == []


def test_leaving_the_block_releases_the_pin_deferred_and_at_once_after_an_error(store):
    client, control, _ = store
    keys = client.block_keys(range(16 * 2))
    client.put(keys, blocks(2))
    with client.pin(keys) as pinned:
        pass
    assert pinned.pin_id in control.pins  # deferred, as a get's pin is...
    with client.pin(keys[:1]) as second:
        assert control.carried[-1] == [pinned.pin_id] and pinned.pin_id not in control.pins  # ...and dropped by the next Pin
    with pytest.raises(RuntimeError):
        with client.pin(keys) as third:
            raise RuntimeError("the engine's copy failed")
    assert third.pin_id not in control.pins and control.calls[-1] == "unpin"  # at once
    third.release()  # idempotent: nothing more is sent
    assert control.calls[-1] == "unpin" and control.calls.count("unpin") == 1
    client.close()
    assert not control.pins  # close() drops what is still deferred (second's pin)
    assert second.pin_id not in control.pins


def test_verify_catches_a_slot_that_changed_while_pinned(store):
    client, control, _ = store
    keys, data = client.block_keys(range(16 * 3)), blocks(3)
    client.put(keys, data)
    with client.pin(keys) as pinned:
        hashes = [xxhash.xxh3_64_intdigest(pinned.block(i)) for i in range(3)]
        pinned.verify_hashes(hashes)
        s = pinned.slots[1]
        pinned.pool_view[s.offset + 100] ^= 0xFF
        pinned.verify(0)
        with pytest.raises(ChecksumMismatchError, match=keys[1].hex()):
            pinned.verify(1)
        changed = [xxhash.xxh3_64_intdigest(pinned.block(i)) for i in range(3)]
        with pytest.raises(ChecksumMismatchError, match=f"{keys[1].hex()} .*1 of 3 blocks"):
            pinned.verify_hashes(changed)
        pinned.verify_hashes(changed[:1])  # the loaded leading run only
        pinned.pool_view[s.offset + 100] ^= 0xFF
        pinned.verify(1)


def test_pins_on_a_transport_without_a_pool_say_where_but_read_nothing(store, monkeypatch):
    client, control, mover = store
    keys = client.block_keys(range(16))
    client.put(keys, blocks(1))
    monkeypatch.setattr(mover, "pool_view", lambda: None)
    with client.pin(keys) as pinned:
        assert pinned.pool_view is None and pinned.slots[0] == SlotRef(0, *control.blocks[keys[0].digest][:2], pinned.pin_id,
                                                                       control.blocks[keys[0].digest][2], 2**62)
        with pytest.raises(ValueError, match="maps no pool"):
            pinned.verify(0)
    assert isinstance(pinned.stats, TransferStats)
