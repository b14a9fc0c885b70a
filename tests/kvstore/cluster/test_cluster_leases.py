"""Cluster-wide single writer (C22) with real nodes: `kvstore serve` processes on loopback joined through a real etcd.

Two clients on two nodes acquire the same prompt at once: while each key's directory home (D1) answers, exactly
one of them is granted each key, and the other waits (Wait long-polls the home) until the winner's block is
committed and announced, then reads it from the winner byte-exact. With the home stopped, each side computes at
most once (at most two computations in all) and no wait outlasts the wait timeout it asked for. A winner killed
while holding its claims: the other side is granted once the view drops it (within TTL + 1 s), and nothing the
winner had not committed is visible.
"""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from kvclient.errors import BlockNotFoundError
from kvstore.cluster.directory import Rendezvous
from kvstore.index import tenant_tag
from kvwire.types import BlockState, LeaseOutcome
from tests.clusterproc import ClusterProcs

pytestmark = pytest.mark.etcd

TTL_S = 2  # ClusterProcs' membership lease


def block(key, size: int = 16 << 10) -> np.ndarray:
    """A block's bytes, a function of its key: whoever computes it computes the same bytes."""
    seed = int.from_bytes(key.digest[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def first_home(key, names: list[str], tenant: str = "alpha") -> str:
    """The key's D1 among names, as every node computes it (HRW top-1 over the active members)."""
    ring = Rendezvous(names)
    return ring.names[int(ring.homes([tenant_tag(tenant) + key.digest], count=1)[0, 0])]


def keys_homed_at(client, home: str, names: list[str], n: int, start: int = 0) -> list:
    """n one-block prompts whose only key has home as its D1."""
    out, offset = [], start
    while len(out) < n:
        key = client.block_keys(np.arange(16) + offset)[0]
        offset += 16
        if first_home(key, names) == home:
            out.append(key)
    return out


def at_once(*calls):
    """Run the calls on threads released together; their results, in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.fixture
def trio(etcd, cluster_name, tmp_path):
    with ClusterProcs(tmp_path, etcd, cluster_name, size=3) as cluster:
        yield cluster


NAMES = ["n0", "n1", "n2"]


def test_the_same_prompt_on_two_nodes_is_granted_once_and_the_waiter_reads_it(trio, fingerprint) -> None:
    with trio.client(0, fingerprint) as a, trio.client(1, fingerprint) as b:
        keys = a.block_keys(np.arange(16 * 12))  # a chain: its keys' homes are spread over all three nodes
        assert {first_home(k, NAMES) for k in keys} == set(NAMES)
        got_a, got_b = at_once(lambda: a.acquire(keys, ttl_s=30), lambda: b.acquire(keys, ttl_s=30))
        outcomes = sorted([[x.outcome for x in got_a], [x.outcome for x in got_b]])
        # The chain's head decides for the whole chain: one side computes all of it, the other waits for all of it.
        assert outcomes == [[LeaseOutcome.GRANTED] * 12, [LeaseOutcome.PENDING] * 12], outcomes
        for mine, winner in ((got_a, "n1"), (got_b, "n0")):
            for info in mine:
                if info.outcome == LeaseOutcome.PENDING:  # the winner's node, and its claim's expiry (the lease's 30 s)
                    assert info.owner == f"node {winner}" and info.expires_unix_ms > time.time() * 1000 + 20_000
        won_a = [k for k, x in zip(keys, got_a) if x.outcome == LeaseOutcome.GRANTED]
        won_b = [k for k, x in zip(keys, got_b) if x.outcome == LeaseOutcome.GRANTED]
        assert len(won_a) + len(won_b) == len(keys)  # each block computed once, cluster-wide

        def waiter(client, theirs: list, timeout_s: float = 10) -> tuple[list[BlockState], float]:
            started = time.monotonic()
            states = client.wait(theirs, timeout_s)
            return states, time.monotonic() - started

        # Each side waits for the other's blocks while computing (putting) its own a moment later.
        waits = []
        threads = [threading.Thread(target=lambda c=c, t=t: waits.append(waiter(c, t))) for c, t in ((a, won_b), (b, won_a)) if t]
        for t in threads:
            t.start()
        time.sleep(0.3)
        if won_a:
            a.put(won_a, [block(k) for k in won_a])
        if won_b:
            b.put(won_b, [block(k) for k in won_b])
        for t in threads:
            t.join(15)
        for states, took in waits:
            assert states and all(s == BlockState.PRESENT for s in states) and took < 5
        for client in (a, b):
            assert [bytes(memoryview(g)) for g in client.get(keys)] == [block(k).tobytes() for k in keys]
    granted = sum(trio.counters(i).get("cluster_claims_granted", 0) for i in range(3))
    pending = sum(trio.counters(i).get("cluster_claims_pending", 0) for i in range(3))
    assert granted == len(keys) and pending == len(keys)
    assert sum(trio.counters(i).get("cluster_claims_local", 0) for i in range(3)) == 0


def test_a_released_claim_passes_to_the_waiting_node(trio, fingerprint) -> None:
    with trio.client(0, fingerprint) as a, trio.client(1, fingerprint) as b:
        keys = keys_homed_at(a, "n2", NAMES, 2) + keys_homed_at(a, "n1", NAMES, 2, start=1 << 20)
        assert [x.outcome for x in a.acquire(keys)] == [LeaseOutcome.GRANTED] * 4
        assert [x.outcome for x in b.acquire(keys)] == [LeaseOutcome.PENDING] * 4
        threading.Timer(0.3, a.release, args=(keys,)).start()
        started = time.monotonic()
        assert b.wait(keys, 5) == [BlockState.MISSING] * 4  # nobody computes them now
        assert time.monotonic() - started < 2
        assert [x.outcome for x in b.acquire(keys)] == [LeaseOutcome.GRANTED] * 4
        assert [x.outcome for x in a.acquire(keys)] == [LeaseOutcome.PENDING] * 4


def test_a_claim_lives_as_long_as_its_lease_renewed_or_not(trio, fingerprint) -> None:
    with trio.client(0, fingerprint) as a, trio.client(1, fingerprint) as b:
        kept, lapsing = keys_homed_at(a, "n2", NAMES, 2), keys_homed_at(a, "n2", NAMES, 2, start=1 << 20)
        assert [x.outcome for x in a.acquire(kept, ttl_s=1)] == [LeaseOutcome.GRANTED] * 2
        assert [x.outcome for x in a.acquire(lapsing, ttl_s=1)] == [LeaseOutcome.GRANTED] * 2
        with a.keep_leases(kept, 1.0) as keeper:
            time.sleep(2.0)  # twice the TTL: kept's claims are renewed with their leases, lapsing's lapse
            assert keeper.renewals >= 3
            assert [x.outcome for x in b.acquire(kept)] == [LeaseOutcome.PENDING] * 2
            assert [x.outcome for x in b.acquire(lapsing)] == [LeaseOutcome.GRANTED] * 2


def test_claims_are_per_tenant(trio, fingerprint) -> None:
    """The same block keys under two tenants are two storage keys: both are granted. The tenant is the token's."""
    with trio.client(0, fingerprint, tenant="alpha") as a, trio.client(1, fingerprint, tenant="beta") as b:
        keys = a.block_keys(np.arange(16 * 4))
        assert keys == b.block_keys(np.arange(16 * 4))
        assert [x.outcome for x in a.acquire(keys)] == [LeaseOutcome.GRANTED] * 4
        assert [x.outcome for x in b.acquire(keys)] == [LeaseOutcome.GRANTED] * 4
        with trio.client(2, fingerprint, tenant="alpha") as c:
            assert [x.outcome for x in c.acquire(keys)] == [LeaseOutcome.PENDING] * 4


def test_more_waiters_than_a_home_holds_long_polls_for_all_see_the_block(trio, fingerprint) -> None:
    """16 Waits on n1 for claims held at n2, twice the long-polls n2 holds at once (peer_service.CLAIM_WAITS_SERVED):
    the rest are answered at once and poll; every one sees the blocks soon after they are put."""
    tenants = ("alpha", "beta")  # 8 Waits per tenant is a node's limit (max_waits_per_tenant)
    with trio.client(0, fingerprint, tenant="alpha") as wa, trio.client(0, fingerprint, tenant="beta") as wb:
        winners = dict(zip(tenants, (wa, wb)))
        keys = {t: keys_homed_at(winners[t], "n2", NAMES, 2) for t in tenants}
        for t in tenants:
            assert [x.outcome for x in winners[t].acquire(keys[t], ttl_s=30)] == [LeaseOutcome.GRANTED] * 2
        waiters = [(t, trio.client(1, fingerprint, tenant=t)) for t in tenants for _ in range(8)]
        try:
            for t, client in waiters:
                assert [x.outcome for x in client.acquire(keys[t])] == [LeaseOutcome.PENDING] * 2
            results: list = []

            def wait(t: str, client) -> None:
                states = client.wait(keys[t], 15)
                results.append((states, time.monotonic()))

            threads = [threading.Thread(target=wait, args=w) for w in waiters]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            put_at = time.monotonic()
            for t in tenants:
                winners[t].put(keys[t], [block(k) for k in keys[t]])
            for thread in threads:
                thread.join(20)
            assert len(results) == 16
            assert all(states == [BlockState.PRESENT] * 2 for states, _ in results), results
            assert max(at for _, at in results) - put_at < 2.0
        finally:
            for _, client in waiters:
                client.close()


def test_with_the_home_stopped_each_side_computes_at_most_once_and_waits_no_longer_than_asked(trio, fingerprint) -> None:
    home = trio.nodes[2].proc
    with trio.client(0, fingerprint) as a, trio.client(1, fingerprint) as b:
        raced = keys_homed_at(a, "n2", NAMES, 3)
        held = keys_homed_at(a, "n2", NAMES, 3, start=1 << 20)
        assert [x.outcome for x in a.acquire(held, ttl_s=30)] == [LeaseOutcome.GRANTED] * 3
        assert [x.outcome for x in b.acquire(held, ttl_s=30)] == [LeaseOutcome.PENDING] * 3
        home.send_signal(signal.SIGSTOP)
        try:
            # B waits on a claim held at the stopped home: the wait ends by its own timeout; a home that did not
            # answer by then counts as unreachable, so the keys are no longer claimed (B acquires them next).
            started = time.monotonic()
            assert b.wait(held, 1.0) == [BlockState.MISSING] * 3
            assert 0.7 < time.monotonic() - started < 1.3
            # Both acquire the same prompt at once: the home cannot answer, so each is granted (at most two computations).
            timed = at_once(*[lambda c=c: (time.monotonic(), c.acquire(raced, ttl_s=30), time.monotonic()) for c in (a, b)])
            for started, infos, ended in timed:
                assert [x.outcome for x in infos] == [LeaseOutcome.GRANTED] * 3
                assert ended - started < 1.0  # bounded by the claim's deadline, far below any wait timeout
            assert [x.outcome for x in b.acquire(held, ttl_s=30)] == [LeaseOutcome.GRANTED] * 3  # B takes over A's too
        finally:
            home.send_signal(signal.SIGCONT)
    assert trio.counters(0).get("cluster_claims_local", 0) + trio.counters(1).get("cluster_claims_local", 0) >= 6


@pytest.mark.parametrize("home", ["n2", "n0"])
def test_a_killed_winner_hands_its_claims_over_once_the_view_drops_it(trio, fingerprint, home) -> None:
    """home n2: a third node holds the claims and ends them at the view change; home n0: the winner was the home
    itself, so the waiter's long-poll breaks and its next acquire is granted locally."""
    with trio.client(0, fingerprint) as a, trio.client(1, fingerprint) as b:
        keys = keys_homed_at(a, home, NAMES, 3)
        assert [x.outcome for x in a.acquire(keys, ttl_s=60)] == [LeaseOutcome.GRANTED] * 3
        assert [x.outcome for x in b.acquire(keys, ttl_s=60)] == [LeaseOutcome.PENDING] * 3
        waited: list = []

        def wait() -> None:
            try:
                waited.append((b.wait(keys, 20), time.monotonic()))
            except Exception as err:  # reported below, not lost in a thread
                waited.append((err, time.monotonic()))

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)
        killed = time.monotonic()
        trio.nodes[0].proc.send_signal(signal.SIGKILL)
        trio.nodes[0].proc.wait(10)
        waiter.join(25)
        states, woke = waited[0]
        assert states == [BlockState.MISSING] * 3 and woke - killed <= TTL_S + 1.0, (states, woke - killed)
        granted_at = None
        while granted_at is None and time.monotonic() - killed < TTL_S + 1.0:
            if [x.outcome for x in b.acquire(keys, ttl_s=60)] == [LeaseOutcome.GRANTED] * 3:
                granted_at = time.monotonic()
            else:
                time.sleep(0.05)
        assert granted_at is not None, f"B not granted within TTL + 1 s of the kill ({time.monotonic() - killed:.2f} s)"
        for key in keys:  # nothing A had not committed is visible
            with pytest.raises(BlockNotFoundError):
                b.get([key])
