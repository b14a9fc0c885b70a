"""Child process for lease tests: races for a key, or takes a lease and then waits to be killed."""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from kvclient import KVClient, SlotRef, TransferStats
from kvwire.keys import Fingerprint
from kvwire.types import BlockState, LeaseOutcome


def block_for(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def race(client: KVClient, tokens: list[int]) -> dict:
    key = client.block_keys(tokens)[0]
    client.lookup([key])  # connected and warmed up
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # the test releases all racers at once
    lease = client.acquire([key])[0]
    if lease.outcome == LeaseOutcome.GRANTED:
        time.sleep(2.0)  # "compute" the block while the others wait
        client.put([key], [block_for(7, 65536)])
        role = "owner"
    else:
        state = client.wait([key], timeout_s=20)[0]
        assert state == BlockState.PRESENT, state
        role = "waiter"
    data = client.get([key])[0]
    return {"role": role, "outcome": lease.outcome.name, "owner": lease.owner, "ok": bool(np.array_equal(data, block_for(7, 65536)))}


def hold_and_hang(client: KVClient, tokens: list[int], size: int) -> None:
    """Reserve space, write half the block, then hang until SIGKILLed."""
    key = client.block_keys(tokens)[0]
    outcome, lease_id, offset, _, expires_unix_ms = client.control.reserve(client.fingerprint_id, [key.digest], [size]).leases[0]
    assert outcome == LeaseOutcome.GRANTED
    half = SlotRef(0, offset, size // 2, lease_id, 0, expires_unix_ms)
    client.transport.write([key.digest], [half], [np.full(size // 2, 0xAB, np.uint8)], TransferStats())
    print(json.dumps({"ready": True, "lease_id": lease_id}), flush=True)
    time.sleep(3600)


def main() -> None:
    args = json.loads(sys.argv[1])
    fp = Fingerprint(**args["fingerprint"])
    with KVClient(args["address"], fp, tenant=args.get("tenant")) as client:
        if args["mode"] == "race":
            print(json.dumps(race(client, args["tokens"])), flush=True)
        else:
            hold_and_hang(client, args["tokens"], args["size"])


if __name__ == "__main__":
    main()
