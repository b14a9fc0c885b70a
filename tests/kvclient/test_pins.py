"""kvclient/pins.py's Unpins: deferred unpins ride on the next Pin, and the thread that sends what is left
wakes neither once per Pin of a steady stream nor never."""
from __future__ import annotations

import threading
import time

from kvclient.pins import Unpins


class CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.notified = 0

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        super().notify(n)


def wait_for(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_steady_pin_stream_does_not_wake_the_unpin_thread_per_pin_and_a_pause_sends_what_is_left():
    """Pins ~0.5 ms apart for several idle_s: each takes the ids waiting and, after its round trip, defers its
    own. The thread, free to run during every round trip, must not park there (finding the ids just taken)
    to be woken by the next later(): that was a thread switch per Pin, ~30 us of a 512-key prefix Pin."""
    sent: list[list[int]] = []
    unpins = Unpins(sent.append, idle_s=0.05)
    unpins._cv = CountingCondition()
    carried: list[int] = []
    try:
        started = time.monotonic()
        pin_id = 0
        while time.monotonic() - started < 0.3:
            pin_id += 1
            carried += unpins.take()
            time.sleep(0.0005)  # the round trip
            unpins.later(pin_id)
        assert pin_id > 100
        assert unpins._cv.notified < 10  # parked only where a gap of idle_s let it send (a busy machine's stall)
        wait_for(lambda: pin_id in [i for ids in sent for i in ids])  # idle_s after the last Pin, what is left goes
        assert sorted(carried + [i for ids in sent for i in ids]) == list(range(1, pin_id + 1))  # each once
        unpins.later(pin_id + 1)  # the thread is parked now: this wakes it
        wait_for(lambda: sent[-1] == [pin_id + 1])
        assert sent[-1] == [pin_id + 1]
    finally:
        unpins.close()
