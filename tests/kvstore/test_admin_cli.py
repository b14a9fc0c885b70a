"""`kvstore-admin` as a real subprocess against a real server, each command checked by its effect."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError, UnavailableError
from kvwire.types import LeaseOutcome, PutOutcome
from tests.conftest import make_fingerprint
from tests.kvstore.admin_util import ADMIN_TOKEN, admin_json, auth_flags, patterned_blocks, pin, run_admin, unpin

BLOCK = 16 << 10
ALICE = (("authorization", "Bearer alice-secret"),)


def tokens(n_blocks: int, start: int = 0) -> list[int]:
    return list(range(start, start + n_blocks * 16))


@pytest.fixture
def srv(make_server, tmp_path):
    return make_server(**auth_flags(tmp_path, host_memory="32MiB", ssd_capacity="128MiB", max_block_bytes="1MiB"))


def readable(client: KVClient, keys) -> list[bool]:
    out = []
    for key in keys:
        try:
            client.get([key])
            out.append(True)
        except BlockNotFoundError:
            out.append(False)
    return out


def audit_actions(srv) -> list[dict]:
    return [json.loads(line) for line in (srv.data_dir / "audit.log").read_text().splitlines()]


def test_stats_and_ls_filter_and_page(srv, fingerprint):
    other = make_fingerprint(model="other-model")
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice, KVClient(srv.address, other, token="bob-secret") as bob:
        ka = alice.block_keys(tokens(6))
        alice.put(ka, patterned_blocks(6, BLOCK, 1))
        kb = bob.block_keys(tokens(4))
        bob.put(kb, patterned_blocks(4, BLOCK, 2))
        alice.get(ka[:3])
        with pytest.raises(BlockNotFoundError):
            alice.get(alice.block_keys(tokens(1, start=10_000)))

    stats = admin_json(srv, "stats")
    assert stats["store"]["blocks"] == 10
    host = next(t for t in stats["store"]["tiers"] if t["tier"] == "TIER_HOST")
    assert (host["blocks"], host["used_bytes"]) == (10, 10 * BLOCK)
    assert (stats["store"]["counters"]["hits_host"], stats["store"]["counters"]["misses"]) == (3, 1)
    assert stats["tenants"] == [{"tenant": "alice", "blocks": 6, "bytes": 6 * BLOCK}, {"tenant": "bob", "blocks": 4, "bytes": 4 * BLOCK}]
    human = run_admin(srv, "stats").stdout
    assert "get hit rate" in human and "75.0%" in human and "alice" in human

    assert {b["tenant"] for b in admin_json(srv, "ls", "--tenant", "alice")["blocks"]} == {"alice"}
    by_fp = admin_json(srv, "ls", "--fingerprint", other.id_hex)
    assert sorted(b["key"] for b in by_fp["blocks"]) == sorted(k.hex() for k in kb)
    assert admin_json(srv, "ls", "--tier", "ssd")["matched"] == 0
    assert admin_json(srv, "ls", "--older-than", "1h")["matched"] == 0
    assert admin_json(srv, "ls", "--chain", f"{ka[0].hex()},{ka[1].hex()}")["matched"] == 2

    seen, token = [], ""
    while True:
        page = admin_json(srv, "ls", "--page-size", "4", "--page-token", token)
        assert len(page["blocks"]) <= 4 and page["matched"] == 10
        seen += [(b["tenant"], b["key"]) for b in page["blocks"]]
        token = page["next_page_token"]
        if not token:
            break
    assert len(seen) == len(set(seen)) == 10


def test_evict_by_fingerprint_chain_and_tenant_spares_pinned_and_others(srv, fingerprint):
    other = make_fingerprint(model="other-model")
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice, KVClient(srv.address, other, token="alice-secret") as alice_other, KVClient(
        srv.address, fingerprint, token="bob-secret"
    ) as bob:
        ka, kother, kbob = alice.block_keys(tokens(6)), alice_other.block_keys(tokens(4)), bob.block_keys(tokens(3))
        alice.put(ka, patterned_blocks(6, BLOCK, 1))
        alice_other.put(kother, patterned_blocks(4, BLOCK, 2))
        bob.put(kbob, patterned_blocks(3, BLOCK, 3))  # the same keys as ka[:3], under another tenant
        held = pin(srv, fingerprint.id, [ka[0].digest], metadata=ALICE)

        report = admin_json(srv, "evict", "--fingerprint", fingerprint.id_hex, "--tenant", "alice")
        assert (report["evicted"], report["skipped_pinned"], report["bytes"]) == (5, 1, 5 * BLOCK)
        assert readable(alice, ka) == [True] + [False] * 5
        assert all(readable(alice_other, kother)) and all(readable(bob, kbob))
        unpin(srv, [held.pin_id], metadata=ALICE)

        report = admin_json(srv, "evict", "--chain", ",".join(k.hex() for k in kother[:2]))
        assert report["evicted"] == 2
        assert readable(alice_other, kother) == [False, False, True, True]

        assert admin_json(srv, "evict", "--tenant", "bob")["evicted"] == 3
        assert not any(readable(bob, kbob))
        assert readable(alice, ka[:1]) == [True] and all(readable(alice_other, kother[2:]))

        assert admin_json(srv, "delete", "--tenant", "alice")["deleted"] == 3
        assert admin_json(srv, "stats")["store"]["blocks"] == 0

    refused = run_admin(srv, "evict")
    assert refused.returncode == 1 and "InvalidRequestError" in refused.stderr
    evicts = [a for a in audit_actions(srv) if a["action"] == "evict"]
    assert [(a["tenant"], a["evicted"], a["target"]) for a in evicts] == [
        ("ops", 5, {"fingerprint": fingerprint.id_hex, "tenant": "alice"}),
        ("ops", 2, {"keys": 2}),
        ("ops", 3, {"tenant": "bob"}),
    ]
    assert [a["deleted"] for a in audit_actions(srv) if a["action"] == "delete"] == [3]


def test_evict_to_watermark_demotes_host_then_drops_ssd(srv, fingerprint):
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice:
        keys = alice.block_keys(tokens(20))
        blocks = patterned_blocks(20, BLOCK, 4)
        alice.put(keys, blocks)
        report = admin_json(srv, "evict", "--watermark", "0.0001", "--tier", "host")
        assert (report["evicted"], report["demoted"]) == (0, 20)
        assert admin_json(srv, "ls", "--tier", "ssd")["matched"] == 20
        assert all(np.array_equal(a, b) for a, b in zip(alice.get(keys[:5]), blocks))  # promoted back to host
        report = admin_json(srv, "evict", "--watermark", "0.0001", "--tier", "ssd")
        assert (report["evicted"], report["demoted"]) == (15, 5)
        assert readable(alice, keys) == [True] * 5 + [False] * 15


def test_leases_list_and_revoke(srv, fingerprint):
    with KVClient(srv.address, fingerprint, token="alice-secret") as first, KVClient(srv.address, fingerprint, token="alice-secret") as second:
        keys = first.block_keys(tokens(3))
        first.put(keys[2:], patterned_blocks(1, BLOCK, 5))
        granted = first.acquire(keys[:2])
        assert {g.outcome for g in granted} == {LeaseOutcome.GRANTED}
        held = pin(srv, fingerprint.id, [keys[2].digest], metadata=ALICE)

        listed = admin_json(srv, "leases")["leases"]
        assert sorted((l["kind"], l["owner"], l["tenant"]) for l in listed) == [("pin", "pinner", "alice"), ("write", first.client_id, "alice"), ("write", first.client_id, "alice")]
        assert "EXPIRES IN" in run_admin(srv, "leases").stdout
        assert second.acquire(keys[:1])[0].outcome == LeaseOutcome.PENDING

        assert admin_json(srv, "leases", "revoke", str(granted[0].lease_id)) == {"leases": 1, "pins": 0}
        assert second.acquire(keys[:1])[0].outcome == LeaseOutcome.GRANTED
        assert admin_json(srv, "leases", "revoke", "--owner", first.client_id) == {"leases": 1, "pins": 0}
        assert admin_json(srv, "leases", "revoke", "--tenant", "alice") == {"leases": 1, "pins": 1}
        assert admin_json(srv, "leases")["leases"] == []
        assert held.pin_id and second.acquire(keys[1:2])[0].outcome == LeaseOutcome.GRANTED
    assert [(a["action"], a["leases"], a["pins"]) for a in audit_actions(srv)] == [("revoke", 1, 0), ("revoke", 1, 0), ("revoke", 1, 1)]


def test_drain_refuses_writes_waits_for_readers_flushes_and_exits_zero(make_server, tmp_path, fingerprint):
    srv = make_server(**auth_flags(tmp_path, host_memory="32MiB", ssd_capacity="128MiB", max_block_bytes="1MiB", persist_on_shutdown=False))
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice:
        keys = alice.block_keys(tokens(6))
        blocks = patterned_blocks(6, BLOCK, 6)
        alice.put(keys[:5], blocks[:5])
        held = pin(srv, fingerprint.id, [keys[0].digest], metadata=ALICE)
        cmd = [sys.executable, "-m", "kvstore.admin", "--server", srv.address, "--token", ADMIN_TOKEN, "--json", "drain", "--reader-timeout", "30s", "--wait"]
        drain = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while True:  # writes are refused once the drain has begun
            try:
                assert alice.put(keys[5:], blocks[5:]) == [PutOutcome.STORED]
                alice.delete(keys[5:])
            except UnavailableError:
                break
            assert time.monotonic() < deadline, "drain never stopped admitting writes"
            time.sleep(0.05)
        assert np.array_equal(alice.get(keys[1:2])[0], blocks[1])  # readers still served
        assert drain.poll() is None  # waiting for the pinned reader
        unpin(srv, [held.pin_id], metadata=ALICE)
        out, err = drain.communicate(timeout=30)
    assert drain.returncode == 0, err
    assert json.loads(out) | {"waited_ms": 0} == {"flushed_blocks": 5, "readers_left": 0, "waited_ms": 0, "handed_off": 0, "handoff_failed": 0}
    assert srv.proc.wait(30) == 0
    actions = audit_actions(srv)
    assert [(a["action"], a["tenant"]) for a in actions] == [("drain", "ops"), ("drained", "ops")] and actions[1]["flushed_blocks"] == 5

    srv.start()  # persist_on_shutdown is off: only the drain's flush can have kept them
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice:
        assert all(np.array_equal(a, b) for a, b in zip(alice.get(keys[:5]), blocks[:5]))


def test_drain_answers_within_the_callers_deadline_while_a_reader_holds_on(make_server, tmp_path, fingerprint):
    """A reader that never unpins must not hold the operator's drain past its RPC deadline (--timeout),
    however long --reader-timeout allows: the drain answers in time, counts the reader, flushes and exits."""
    srv = make_server(**auth_flags(tmp_path, host_memory="32MiB", ssd_capacity="128MiB", max_block_bytes="1MiB", persist_on_shutdown=False))
    with KVClient(srv.address, fingerprint, token="alice-secret") as alice:
        keys = alice.block_keys(tokens(2))
        alice.put(keys, patterned_blocks(2, BLOCK, 7))
        pin(srv, fingerprint.id, [keys[0].digest], metadata=ALICE)
    started = time.monotonic()
    report = admin_json(srv, "--timeout", "4s", "drain", "--reader-timeout", "60s")
    assert time.monotonic() - started < 4
    assert (report["readers_left"], report["flushed_blocks"]) == (1, 2)
    assert srv.proc.wait(30) == 0
