"""Crash rounds: writers put a mix of durable and non-durable blocks through KVClient (inline gRPC, shm, UCX)
while the server is SIGKILLed or SIGTERMed; after each restart every block the contract covers must be there,
byte-exact.

The contract: a block acknowledged as durable survives any crash; after SIGTERM (an orderly
shutdown flushes the host tier) every acknowledged block survives; once covered, always
covered. Any block that is present, acknowledged or not, must be byte-exact: a block read
back with other bytes is torn. A writer's put may fail only once the server is gone, and
then it must come back in bounded time; a SIGTERMed server must exit in bounded time.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from kvclient import KVClient
from kvwire.keys import BlockKey
from kvwire.types import PutOutcome
from kvwire.ucxenv import import_ucxx
from tests.conftest import make_fingerprint
from tests.soak.soak_util import (ALICE, BOB, SCALE, SEED, TENANT_OF, block_bytes, campaign_rng, report, scaled,
                                  soak_server, stop_cleanly)

ROUNDS = 2  # x scale; every third round is SIGTERM, the others SIGKILL
LOAD_S = (0.8, 1.6)  # how long the writers run before the signal, drawn per round
SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 200_000]
WRITER_TIMEOUT_S = 10  # each writer call's deadline: a writer must return within a few of these after the signal
FP = make_fingerprint(model="soak-crash")
TRANSPORTS = ["grpc", "shm", "ucx" if import_ucxx() is not None else "auto"]
pytestmark = [pytest.mark.soak, pytest.mark.timeout(120 + 90 * SCALE)]


@dataclass
class Entry:
    tenant: str
    key: bytes
    size: int
    durable: bool
    round: int
    acked: bool = False
    covered: bool = False  # the contract says it must be present from now on

    def data(self) -> bytes:
        return block_bytes(self.tenant.encode() + self.key, self.size)


class Writer(threading.Thread):
    """Puts batches of 1-6 fresh blocks, durable or not, until told to stop or the server is gone."""

    def __init__(self, address: str, token: str, transport: str, round_no: int, index: int) -> None:
        super().__init__(name=f"soak-writer-{round_no}-{index}", daemon=True)
        self.address, self.token, self.transport = address, token, transport
        self.round, self.index = round_no, index
        self.rng = campaign_rng("crash", round_no, index)
        self.entries: list[Entry] = []
        self.stop = threading.Event()
        self.ended_by, self.ended_at = "", 0.0

    def run(self) -> None:
        tenant = TENANT_OF[self.token]
        try:
            with KVClient(self.address, FP, tenant=tenant, token=self.token, transport=self.transport, timeout_s=WRITER_TIMEOUT_S) as client:
                batch = 0
                while not self.stop.is_set():
                    n, durable = self.rng.randint(1, 6), self.rng.random() < 0.5
                    start = ((self.round * 64 + self.index) << 24) + batch * 6 * 16
                    keys = client.block_keys(list(range(start, start + n * 16)))
                    entries = [Entry(tenant, k.digest, self.rng.choice(SIZES), durable, self.round) for k in keys]
                    self.entries += entries  # before the put: a block may land although its answer never comes
                    outcomes = client.put(keys, [np.frombuffer(e.data(), np.uint8) for e in entries], durable=durable)
                    for e, outcome in zip(entries, outcomes):
                        e.acked = outcome == PutOutcome.STORED
                    batch += 1
            self.ended_by = "stopped"
        except Exception as err:  # the server went away under the put: expected, and the put is unacknowledged
            self.ended_by = f"{type(err).__name__}: {err}"
        self.ended_at = time.monotonic()


def verify(address: str, entries: list[Entry]) -> tuple[list[str], list[str], int]:
    """(lost, torn, unacknowledged-but-present) over every block ever tried."""
    lost, torn, extra = [], [], 0
    for token in (ALICE, BOB):
        tenant = TENANT_OF[token]
        mine = [e for e in entries if e.tenant == tenant]
        with KVClient(address, FP, tenant=tenant, token=token, transport="grpc", timeout_s=30) as client:
            for at in range(0, len(mine), 256):
                chunk = mine[at : at + 256]
                present = client.contains([BlockKey(e.key) for e in chunk])
                for e, here in zip(chunk, present):
                    if e.covered and not here:
                        lost.append(f"round {e.round} {'durable' if e.durable else 'acked'} block {e.key.hex()} ({e.size} B)")
                    extra += here and not e.acked
                found = [e for e, here in zip(chunk, present) if here]
                for e in found:
                    try:
                        got = client.get([BlockKey(e.key)])[0]
                    except Exception as err:
                        torn.append(f"round {e.round} block {e.key.hex()}: present but unreadable: {type(err).__name__}: {err}")
                        continue
                    if got.tobytes() != e.data():
                        torn.append(f"round {e.round} block {e.key.hex()}: {got.nbytes} bytes differ from the {e.size} written")
    return lost, torn, extra


def test_crash_rounds(tmp_path):
    server = soak_server(tmp_path, host_memory="64MiB", ssd_capacity="8GiB")
    entries: list[Entry] = []
    counts = {"rounds": 0, "sigkill": 0, "sigterm": 0, "blocks_tried": 0, "acked": 0, "acked_durable": 0, "checked": 0,
              "lost": 0, "torn": 0, "unacked_present": 0, "hangs": 0}
    failures: list[str] = []
    try:
        for r in range(scaled(ROUNDS)):
            sig = signal.SIGTERM if r % 3 == 1 else signal.SIGKILL
            rng = campaign_rng("crash-round", r)
            writers = [Writer(server.address, [ALICE, BOB][i % 2], TRANSPORTS[i % len(TRANSPORTS)], r, i) for i in range(3)]
            for w in writers:
                w.start()
            time.sleep(rng.uniform(*LOAD_S))
            signalled_at = time.monotonic()
            if sig == signal.SIGKILL:
                server.stop(signal.SIGKILL)
            else:
                stopped = stop_cleanly(server)
                if stopped:
                    counts["hangs"] += "did not exit" in stopped
                    failures.append(f"round {r}: {stopped}")
            for w in writers:
                w.stop.set()
            for w in writers:
                w.join(WRITER_TIMEOUT_S * 3)
                if w.is_alive():
                    counts["hangs"] += 1
                    failures.append(f"round {r}: writer {w.index} ({w.transport}) still blocked {WRITER_TIMEOUT_S * 3}s after the server went")
                elif w.ended_at < signalled_at:
                    failures.append(f"round {r}: writer {w.index} ({w.transport}) failed while the server was up: {w.ended_by}")
                entries += w.entries
            acked_now = [e for e in entries if e.round == r and e.acked]
            for e in acked_now:
                e.covered = e.durable or sig == signal.SIGTERM
            counts["rounds"] += 1
            counts["sigkill" if sig == signal.SIGKILL else "sigterm"] += 1
            server.start()
            lost, torn, extra = verify(server.address, entries)
            failures += [f"round {r} ({signal.Signals(sig).name}): lost {x}" for x in lost] + [f"round {r}: torn {x}" for x in torn]
            counts["lost"] += len(lost)
            counts["torn"] += len(torn)
            counts["unacked_present"] = extra
            if lost or torn or any(w.is_alive() for w in writers):
                break
    finally:
        counts["blocks_tried"] = len(entries)
        counts["acked"] = sum(e.acked for e in entries)
        counts["acked_durable"] = sum(e.acked and e.durable for e in entries)
        counts["checked"] = sum(e.covered for e in entries)
        report("crash_rounds", **counts)
        server.stop()
    assert counts["acked_durable"] > 0, "no durable put was acknowledged: the rounds tested nothing"
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures[:40])
