"""Every KVStore and Admin gRPC method, fed raw bytes, mutated valid messages and valid messages of nonsense
values, under valid and invalid tokens; the auth matrix: each method under each kind of caller; and puts far
past full tiers, then requests near gRPC's message cap.

Fails on UNKNOWN or INTERNAL for a well-framed request (one that parses as the method's
request type), on a call that outlives its deadline (the server's limits end every
legitimate wait long before it), on a crash or an unclean SIGTERM, and, in the matrix,
on any call whose status or answer differs from what the caller's token allows, that
shows or changes another tenant's blocks, leases or pins, or whose error names another
tenant or its client id.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import xxhash

from kvclient import KVClient
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.conftest import make_fingerprint
from tests.kvstore.admin_util import ADMIN_TOKEN
from tests.soak.soak_util import (ALICE, BAD_CODES, BOB, CALL_DEADLINE_S, METHODS, SCALE, SEED, Method, Pools,
                                  block_bytes, campaign_rng, metadata, report, request_bytes, scaled, server_alive,
                                  soak_server, stop_cleanly)

CALLS_PER_METHOD = 30  # x scale; 22 methods
MAX_HANGS = 3  # each costs a full deadline: stop early, the campaign has failed anyway
pytestmark = [pytest.mark.soak, pytest.mark.timeout(90 + 60 * SCALE)]

FP = make_fingerprint(model="soak-grpc")
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


@pytest.fixture
def fuzz_server(tmp_path):
    srv = soak_server(tmp_path)
    yield srv
    srv.stop()


def call(channel: grpc.Channel, method: Method, messages: list[bytes], md: tuple) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """One raw call (bytes in, bytes out, no (de)serializer): its status, details and response messages."""
    try:
        if method.client_streaming:
            out = [channel.stream_unary(method.path)(iter(messages), metadata=md, timeout=CALL_DEADLINE_S)]
        elif method.server_streaming:
            out = list(channel.unary_stream(method.path)(messages[0], metadata=md, timeout=CALL_DEADLINE_S))
        else:
            out = [channel.unary_unary(method.path)(messages[0], metadata=md, timeout=CALL_DEADLINE_S)]
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []
    return grpc.StatusCode.OK, "", out


class World:
    """What alice holds before the fuzz: blocks, a held write lease, a pin; and one valid request per method."""

    def __init__(self, server, fp=FP) -> None:
        self.fp_id = fp.id
        self.client_id = "soak-alice-holder"
        md = metadata(ALICE, self.client_id)
        with KVClient(server.address, fp, tenant="alice", token=ALICE, transport="grpc") as client:
            keys = client.block_keys(list(range(4 * 16)))
            self.keys = [k.digest for k in keys]
            client.put(keys, [block_bytes(k, 4096) for k in self.keys])
        self.free_keys = [xxhash.xxh3_128_digest(self.fp_id + b"free%d" % i) for i in range(2)]
        with grpc.insecure_channel(server.address) as channel:
            kv = _typed(channel)
            self.lease_id = kv.Reserve(pb.ReserveRequest(fingerprint_id=self.fp_id, blocks=[pb.BlockSpec(key=self.free_keys[0], size_bytes=4096)], ttl_ms=300_000),
                                       metadata=md, timeout=CALL_DEADLINE_S).leases[0].lease_id
            self.pin_id = kv.Pin(pb.PinRequest(fingerprint_id=self.fp_id, keys=self.keys[:2], ttl_ms=300_000), metadata=md, timeout=CALL_DEADLINE_S).pin_id
        data = block_bytes(b"x", 4096)
        sel = apb.BlockSelector(tenant="matrix-nobody", fingerprint_id=self.fp_id)
        self.valid: dict[str, bytes] = {name: msg.SerializeToString() for name, msg in {
            "Lookup": pb.LookupRequest(fingerprint_id=self.fp_id, keys=self.keys),
            "AcquireLeases": pb.AcquireLeasesRequest(fingerprint_id=self.fp_id, keys=self.free_keys[1:], ttl_ms=1000),
            "RenewLeases": pb.RenewLeasesRequest(lease_ids=[self.lease_id], ttl_ms=300_000),
            "ReleaseLeases": pb.ReleaseLeasesRequest(lease_ids=[self.lease_id]),
            "Wait": pb.WaitRequest(fingerprint_id=self.fp_id, keys=self.free_keys, timeout_ms=200),
            "Reserve": pb.ReserveRequest(fingerprint_id=self.fp_id, blocks=[pb.BlockSpec(key=self.free_keys[1], size_bytes=4096)], ttl_ms=1000),
            "Write": pb.WriteChunk(lease_id=self.lease_id, offset=0, data=data),
            "Commit": pb.CommitRequest(fingerprint_id=self.fp_id, items=[pb.CommitItem(lease_id=self.lease_id, checksum=xxhash.xxh3_64_intdigest(data))]),
            "Put": pb.PutRequest(fingerprint_id=self.fp_id, blocks=[pb.InlineBlock(key=self.free_keys[1], data=data, checksum=xxhash.xxh3_64_intdigest(data))]),
            "Get": pb.GetRequest(fingerprint_id=self.fp_id, keys=self.keys),
            "Pin": pb.PinRequest(fingerprint_id=self.fp_id, keys=self.keys, ttl_ms=1000),
            "Unpin": pb.UnpinRequest(pin_ids=[self.pin_id]),
            "Delete": pb.DeleteRequest(fingerprint_id=self.fp_id, keys=self.keys[3:]),
            "Stats": pb.StatsRequest(),
            "DataPlane": pb.DataPlaneRequest(),
        }.items()}
        self.admin_valid: dict[str, bytes] = {name: msg.SerializeToString() for name, msg in {
            "Stats": pb.StatsRequest(),
            "ListBlocks": apb.ListBlocksRequest(selector=apb.BlockSelector(tenant="alice"), page_size=10),
            "Evict": apb.EvictRequest(selector=sel),
            "DeleteBlocks": apb.DeleteBlocksRequest(selector=sel),
            "ListLeases": apb.ListLeasesRequest(tenant="alice"),
            "RevokeLeases": apb.RevokeLeasesRequest(tenant="matrix-nobody"),
            "Drain": apb.DrainRequest(timeout_ms=1),
            "Cluster": apb.ClusterRequest(local_only=True),  # INVALID_ARGUMENT here: cluster mode is off
        }.items()}

    def valid_for(self, method: Method) -> bytes:
        return (self.valid if method.service == "KVStore" else self.admin_valid)[method.name]

    def held_keys(self) -> set[bytes]:
        """Alice's keys with a block or her write lease behind them."""
        return {*self.keys, self.free_keys[0]}

    def secrets(self) -> list[str]:
        """What no other tenant's error may contain: alice's tenant name and client id (keys and ids it named itself)."""
        return ["alice", self.client_id]


def _typed(channel: grpc.Channel) -> pb_grpc.KVStoreStub:
    return pb_grpc.KVStoreStub(channel)


# ---- the auth matrix ------------------------------------------------------------------

IDENTITIES = {
    "no-token": metadata(None, "m-none"),
    "bad-token": metadata("not-a-token", "m-bad"),
    "empty-bearer": (("authorization", "Bearer "), ("kvstore-client-id", "m-empty")),
    "alice-claims-bob": metadata(ALICE, "m-alice-bob", tenant="bob"),
    "admin-claims-alice": metadata(ADMIN_TOKEN, "m-admin-alice", tenant="alice"),
    "bob": metadata(BOB, "m-bob"),
    "bob-claims-bob": metadata(BOB, "m-bob2", tenant="bob"),
    "admin": metadata(ADMIN_TOKEN, "m-admin"),
    "alice": metadata(ALICE, "m-alice"),
}
AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def expected_class(identity: str, method: Method) -> str:
    """'unauthenticated', 'denied', or 'served' (any answer but an auth refusal, UNKNOWN or INTERNAL)."""
    if identity in ("no-token", "bad-token", "empty-bearer"):
        return "unauthenticated"
    if identity in ("alice-claims-bob", "admin-claims-alice"):
        return "denied"
    if identity == "admin":
        return "served"
    return "denied" if method.service == "Admin" or method.name == "Stats" else "served"


def cross_tenant_deviation(method: Method, code: grpc.StatusCode, out: list[bytes], world: World) -> str | None:
    """Bob (or the admin, as a tenant) naming alice's objects must find nothing of hers."""
    if code != grpc.StatusCode.OK or method.service != "KVStore":
        return None
    if any(world.client_id.encode() in m for m in out):
        return f"{method.name}'s answer names alice's client id"
    resp = [method.response_class.FromString(m) for m in out]
    if method.name in ("Lookup", "Wait") and any(s.state != pb.BLOCK_MISSING for s in resp[0].statuses if s.key in world.held_keys()):
        return f"{method.name} shows alice's block or lease: {resp[0]}"
    if method.name == "Get" and any(r.pieces for r in resp):
        return "Get returned another tenant's blocks"
    if method.name in ("ReleaseLeases", "Unpin") and resp[0].released:
        return f"{method.name} released another tenant's lease or pin"
    if method.name == "Delete" and resp[0].deleted:
        return "Delete removed another tenant's blocks"
    if method.name == "Commit" and any(o == pb.PUT_STORED for o in resp[0].outcomes):
        return "Commit of another tenant's lease stored a block"
    return None


def test_auth_matrix(fuzz_server):
    world = World(fuzz_server, make_fingerprint(model="soak-auth"))
    calls, deviations = 0, []
    with grpc.insecure_channel(fuzz_server.address, options=CHANNEL_OPTIONS) as channel:
        for identity, md in IDENTITIES.items():
            if identity == "alice":  # last, as it may change her state: first check nobody else did
                deviations += alice_state_deviations(channel, world)
            for method in METHODS:
                if method.name == "Drain" and identity == "admin":
                    continue  # a served Drain stops the server; the admin's Drain is the operations tests' business
                raw = world.valid_for(method)
                code, details, out = call(channel, method, [raw], md)
                calls += 1
                want = expected_class(identity, method)
                where = f"{identity} {method.service}.{method.name}: {code.name} {details!r}"
                if want == "unauthenticated" and code != grpc.StatusCode.UNAUTHENTICATED:
                    deviations.append(f"{where} (want UNAUTHENTICATED)")
                elif want == "denied" and code != grpc.StatusCode.PERMISSION_DENIED:
                    deviations.append(f"{where} (want PERMISSION_DENIED)")
                elif want == "served" and (code in AUTH_CODES or code in BAD_CODES):
                    deviations.append(f"{where} (want an answer)")
                if identity.startswith("bob") or (identity == "admin" and method.service == "KVStore"):
                    leaked = [s for s in world.secrets() if s in details]
                    if leaked:
                        deviations.append(f"{where} names alice's {leaked}")
                    problem = cross_tenant_deviation(method, code, out, world)
                    if problem:
                        deviations.append(f"{identity}: {problem}")
    report("auth_matrix", calls=calls, deviations=len(deviations))
    assert not deviations, "\n".join(deviations)


def alice_state_deviations(channel: grpc.Channel, world: World) -> list[str]:
    """After every other caller named alice's blocks, lease and pin: all still hers and intact."""
    kv, md, out = _typed(channel), metadata(ALICE, world.client_id), []
    statuses = kv.Lookup(pb.LookupRequest(fingerprint_id=world.fp_id, keys=world.keys), metadata=md, timeout=CALL_DEADLINE_S).statuses
    if any(s.state != pb.BLOCK_PRESENT for s in statuses):
        out.append(f"alice's blocks changed by other callers: {[pb.BlockState.Name(s.state) for s in statuses]}")
    try:
        kv.RenewLeases(pb.RenewLeasesRequest(lease_ids=[world.lease_id], ttl_ms=300_000), metadata=md, timeout=CALL_DEADLINE_S)
    except grpc.RpcError as err:
        out.append(f"alice's lease lost to other callers: {err.code().name} {err.details()}")
    pieces = [p for r in kv.Get(pb.GetRequest(fingerprint_id=world.fp_id, keys=world.keys), metadata=md, timeout=CALL_DEADLINE_S) for p in r.pieces]
    if [b"".join(p.data for p in pieces if p.key == k) for k in world.keys] != [block_bytes(k, 4096) for k in world.keys]:
        out.append("alice's blocks differ after other callers")
    return out


# ---- the fuzz -----------------------------------------------------------------------


def identity_for(method: Method, rng) -> tuple[str, tuple]:
    """Mostly valid tokens, so requests reach the handlers; some invalid ones. Never a served Drain."""
    roll = rng.random()
    if roll < 0.08:
        return rng.choice([("no-token", metadata(None, "f-none")), ("bad-token", metadata(rng.randbytes(8).hex(), "f-bad")),
                           ("claim", metadata(ALICE, "f-claim", tenant="bob"))])
    if method.service == "Admin" and method.name != "Drain":
        return ("admin", metadata(ADMIN_TOKEN, "f-admin")) if roll < 0.85 else ("alice", metadata(ALICE, "f-alice"))
    if method.name == "Drain":
        return rng.choice([("alice", metadata(ALICE, "f-alice")), ("bob", metadata(BOB, "f-bob"))])
    client = rng.choice(["f-alice", "f-alice-2", "soak-alice-holder", "", "x" * 300])
    if roll < 0.7:
        return "alice", metadata(ALICE, client)
    return ("bob", metadata(BOB, "f-bob")) if roll < 0.88 else ("admin", metadata(ADMIN_TOKEN, "f-admin"))


def test_fuzz_every_grpc_method(fuzz_server):
    world = World(fuzz_server)
    pools = Pools(fingerprint_ids=[world.fp_id], keys=world.keys + world.free_keys, ids=[world.lease_id, world.pin_id, 1, 2, 3])
    total = scaled(CALLS_PER_METHOD) * len(METHODS)
    counts = {"calls": 0, "well_framed": 0, "ok": 0, "refused": 0, "bad_status": 0, "hangs": 0, "crashes": 0}
    failures: list[str] = []
    with grpc.insecure_channel(fuzz_server.address, options=CHANNEL_OPTIONS) as channel:
        for i in range(total):
            method = METHODS[i % len(METHODS)]
            rng = campaign_rng("grpc", i)
            kind, raw = request_bytes(method, rng, pools, world.valid_for(method))
            messages = [raw]
            if method.client_streaming and rng.random() < 0.5:
                messages += [request_bytes(method, rng, pools, world.valid_for(method))[1] for _ in range(rng.randint(1, 3))]
            who, md = identity_for(method, rng)
            well_framed = all(method.parses(m) for m in messages)
            code, details, _ = call(channel, method, messages, md)
            counts["calls"] += 1
            counts["well_framed"] += well_framed
            counts["ok" if code == grpc.StatusCode.OK else "refused"] += 1
            where = f"call #{i} {method.service}.{method.name} ({kind}, {who}, {len(raw)} bytes {raw[:64].hex()}...)"
            if well_framed and code in BAD_CODES:
                counts["bad_status"] += 1
                failures.append(f"{where}: {code.name} {details!r}")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                counts["hangs"] += 1
                failures.append(f"{where}: no answer in {CALL_DEADLINE_S}s")
                if counts["hangs"] >= MAX_HANGS:
                    break
            if code == grpc.StatusCode.UNAVAILABLE and server_alive(fuzz_server, 5):
                counts["crashes"] += 1
                failures.append(f"{where}: server gone: {server_alive(fuzz_server, 1)}\n{fuzz_server.log()[-3000:]}")
                break
    alive = server_alive(fuzz_server)
    if alive:
        counts["crashes"] += 1
        failures.append(f"after the fuzz: {alive}")
    else:
        failures += canary(fuzz_server)
        stopped = stop_cleanly(fuzz_server)
        if stopped:
            counts["hangs"] += "did not exit" in stopped
            failures.append(f"after the fuzz: {stopped}")
    report("fuzz_grpc", **counts)
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures[:40])


def canary(server) -> list[str]:
    """A fresh client still stores and reads back byte-exact over gRPC."""
    fp = make_fingerprint(model="soak-canary")
    with KVClient(server.address, fp, tenant="alice", token=ALICE, transport="grpc", timeout_s=CALL_DEADLINE_S) as client:
        keys = client.block_keys(list(range(3 * 16)))
        blocks = [np.frombuffer(block_bytes(k.digest, 8192), np.uint8) for k in keys]
        client.put(keys, blocks)
        got = client.get(keys)
    return [] if all(np.array_equal(a, b) for a, b in zip(got, blocks)) else ["canary blocks differ after the fuzz"]


# ---- full tiers and huge requests -------------------------------------------------------

PRESSURE_BYTES = 96 << 20  # x scale: twice the host pool and the SSD tier together


def test_full_tiers_and_huge_requests(tmp_path):
    """Durable and plain puts far past both tiers' capacity while pins hold blocks in place, then requests near
    gRPC's message cap: every answer is OK or a typed refusal, never UNKNOWN or INTERNAL, and the server lives."""
    server = soak_server(tmp_path, host_memory="16MiB", ssd_capacity="32MiB")
    rng = campaign_rng("pressure")
    counts = {"puts": 0, "bytes": 0, "stored": 0, "refused": 0, "huge": 0, "bad_status": 0, "hangs": 0}
    failures: list[str] = []
    tenant_md, admin_md = metadata(ALICE, "p-alice"), metadata(ADMIN_TOKEN, "p-ops")
    try:
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            kv = _typed(channel)

            def attempt(what: str, rpc, request, md=tenant_md) -> object | None:
                try:
                    response = rpc(request, metadata=md, timeout=CALL_DEADLINE_S * 4)
                    return list(response) if what.startswith("Get") else response
                except grpc.RpcError as err:
                    counts["refused"] += 1
                    if err.code() in BAD_CODES:
                        counts["bad_status"] += 1
                        failures.append(f"{what}: {err.code().name} {err.details()!r}")
                    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        counts["hangs"] += 1
                        failures.append(f"{what}: no answer")
                    return None

            fp_id, batch, pin_ids, pinned_bytes = FP.id, 0, [], 0
            while counts["bytes"] < scaled(PRESSURE_BYTES) and counts["hangs"] == 0:
                size, n, durable = rng.choice([64 << 10, 256 << 10, 1 << 20]), rng.randint(1, 8), rng.random() < 0.5
                keys = [xxhash.xxh3_128_digest(b"pressure%d-%d" % (batch, j)) for j in range(n)]
                blocks = [pb.InlineBlock(key=k, data=block_bytes(k, size), checksum=xxhash.xxh3_64_intdigest(block_bytes(k, size))) for k in keys]
                # The admin (no tenant share limit) pins what it stores, so the host pool fills with blocks
                # that can be neither evicted nor demoted, and the tenant's writes press on the SSD tier.
                holder = batch % 3 == 0 and pinned_bytes < (8 << 20)  # half the host pool: the rest keeps moving
                md = admin_md if holder else tenant_md
                response = attempt(f"Put #{batch} ({n} x {size} B, durable={durable})", kv.Put,
                                   pb.PutRequest(fingerprint_id=fp_id, blocks=blocks, durable=durable), md)
                counts["puts"] += 1
                counts["bytes"] += n * size
                if response is not None:
                    counts["stored"] += sum(o == pb.PUT_STORED for o in response.outcomes)
                    pinned = holder and attempt(f"Pin #{batch}", kv.Pin, pb.PinRequest(fingerprint_id=fp_id, keys=keys, ttl_ms=60_000), md)
                    if pinned:
                        pin_ids.append(pinned.pin_id)
                        pinned_bytes += n * size
                batch += 1
            many = [xxhash.xxh3_128_digest(b"many%d" % i) for i in range(1_000_000)]
            huge = [
                ("Lookup of 1,000,000 keys", kv.Lookup, pb.LookupRequest(fingerprint_id=fp_id, keys=many)),
                ("Get of 100,000 keys", kv.Get, pb.GetRequest(fingerprint_id=fp_id, keys=many[:100_000])),
                ("Reserve of 100,000 x 1 MiB", kv.Reserve, pb.ReserveRequest(fingerprint_id=fp_id, blocks=[pb.BlockSpec(key=k, size_bytes=1 << 20) for k in many[:100_000]])),
                ("Put of 120 x 1 MiB, durable", kv.Put, pb.PutRequest(fingerprint_id=fp_id, durable=True, blocks=[
                    pb.InlineBlock(key=k, data=block_bytes(k, 1 << 20), checksum=xxhash.xxh3_64_intdigest(block_bytes(k, 1 << 20))) for k in many[:120]])),
                ("Wait on 1,000,000 keys", kv.Wait, pb.WaitRequest(fingerprint_id=fp_id, keys=many, timeout_ms=1000)),
            ]
            for what, rpc, request in huge:
                counts["huge"] += 1
                attempt(what, rpc, request)
            attempt("Unpin", kv.Unpin, pb.UnpinRequest(pin_ids=pin_ids), admin_md)  # room for the canary
        alive = server_alive(server)
        if alive:
            failures.append(f"after the pressure: {alive}")
        else:
            failures += canary(server)
            stopped = stop_cleanly(server)
            if stopped:
                failures.append(f"after the pressure: {stopped}")
    finally:
        report("full_tiers", **counts)
        server.stop()
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures[:40])
