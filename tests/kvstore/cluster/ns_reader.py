"""A client on a partitioned node's own host (run inside its network namespace by the partition test).

Waits until the node reports itself fenced (admin Cluster, this node only), then looks up and reads a chain of
blocks through that node; prints one JSON line: when it saw the fence (CLOCK_MONOTONIC, system-wide on Linux,
so the test can compare), the lookup's answer, and whether the get returned the exact bytes or which error.
"""
from __future__ import annotations

import argparse
import json
import time

import grpc
import numpy as np

from kvclient import KVClient
from kvclient.errors import KVStoreError
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from tests.conftest import make_fingerprint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--admin-token", required=True)
    ap.add_argument("--blocks", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10)
    args = ap.parse_args()
    out: dict = {"fenced_at": None}
    deadline = time.monotonic() + args.timeout
    with grpc.insecure_channel(args.address) as channel:
        admin = apb_grpc.AdminStub(channel)
        md = (("authorization", f"Bearer {args.admin_token}"),)
        while time.monotonic() < deadline:
            if admin.Cluster(apb.ClusterRequest(local_only=True), metadata=md, timeout=2).nodes[0].fenced:
                out["fenced_at"] = time.monotonic()
                break
            time.sleep(0.02)
    with KVClient(args.address, make_fingerprint(), token=args.token) as client:
        out["transport"] = client.transport_choice.chosen
        keys = client.block_keys(np.arange(16 * args.blocks))
        rng = np.random.default_rng(args.seed)
        want = [rng.integers(0, 256, args.size, dtype=np.uint8).tobytes() for _ in range(args.blocks)]
        for name, call in (("lookup", lambda: client.lookup(keys)), ("get", lambda: [bytes(memoryview(g)) for g in client.get(keys)] == want)):
            try:
                out[name] = call()
            except KVStoreError as err:
                out[name] = type(err).__name__
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
