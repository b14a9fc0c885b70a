"""A directory home's write claims (kvstore/cluster/claim_table.py), in process: who is granted, and every way a claim ends."""
from __future__ import annotations

import threading
import time

from kvwire.types import LeaseOutcome
from kvstore.cluster.claim_table import ClaimTable

A, B = ("a", 7), ("b", 9)
LIVE = frozenset({A, B})


def nothing_present(skeys):
    return [False] * len(skeys)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_claimant_is_granted_and_the_others_told_who_holds_it() -> None:
    clock = Clock()
    table = ClaimTable(clock)
    assert [a.outcome for a in table.claim(A, [b"k1", b"k2"], [1, 2], 5.0, LIVE, nothing_present)] == [LeaseOutcome.GRANTED] * 2
    answers = table.claim(B, [b"k1", b"k3"], [11, 13], 5.0, LIVE, nothing_present)
    assert answers[0].outcome == LeaseOutcome.PENDING and answers[0].holder == "a" and answers[0].expires_in_s == 5.0
    assert answers[1].outcome == LeaseOutcome.GRANTED
    clock.now += 2
    assert table.claim(A, [b"k1"], [1], 5.0, LIVE, nothing_present)[0].outcome == LeaseOutcome.GRANTED  # renewed
    assert table.claim(B, [b"k1"], [11], 5.0, LIVE, nothing_present)[0].expires_in_s == 5.0
    assert table.claim(B, [b"k9"], [19], 5.0, LIVE, lambda skeys: [True])[0].outcome == LeaseOutcome.ALREADY_PRESENT


def test_a_claim_ends_by_lapse_release_of_its_own_lease_store_or_its_holder_leaving() -> None:
    clock = Clock()
    table = ClaimTable(clock)
    table.claim(A, [b"k1", b"k2", b"k3", b"k4"], [1, 2, 3, 4], 5.0, LIVE, nothing_present)
    clock.now += 5.0
    assert table.claim(B, [b"k1"], [11], 5.0, LIVE, nothing_present)[0].outcome == LeaseOutcome.GRANTED  # lapsed
    assert table.release(A, [b"k2"], [99]) == 0  # another lease of A's: not the claim it made
    assert table.release(A, [b"k2"], [2]) == 1
    table.stored([b"k3"])
    assert table.forget_dead(frozenset({B})) == 1  # k4: A left the view
    assert [a.outcome for a in table.claim(B, [b"k2", b"k3", b"k4"], [1, 2, 3], 5.0, LIVE, nothing_present)] == [LeaseOutcome.GRANTED] * 3
    # a holder not in the view given to a claim does not hold the key against a live one
    table.claim(A, [b"k5"], [5], 5.0, LIVE, nothing_present)
    assert table.claim(B, [b"k5"], [15], 5.0, frozenset({B}), nothing_present)[0].outcome == LeaseOutcome.GRANTED


def test_wait_wakes_when_the_claim_ends_and_gives_up_at_its_timeout() -> None:
    table = ClaimTable()
    table.claim(A, [b"k1", b"k2"], [1, 2], 30.0, LIVE, nothing_present)
    threading.Timer(0.2, table.stored, args=([b"k1", b"k2"],)).start()
    started = time.monotonic()
    assert table.wait([b"k1", b"k2", b"k0"], 5.0, lambda: LIVE) == []
    assert 0.15 < time.monotonic() - started < 2.0
    table.claim(A, [b"k3"], [3], 30.0, LIVE, nothing_present)
    started = time.monotonic()
    still = table.wait([b"k0", b"k3"], 0.3, lambda: LIVE)
    assert [i for i, _ in still] == [1] and 0.25 < time.monotonic() - started < 1.0
    started = time.monotonic()
    assert table.wait([b"k3"], 5.0, lambda: LIVE, is_active=lambda: False) != []  # the asker went away
    assert time.monotonic() - started < 0.1
