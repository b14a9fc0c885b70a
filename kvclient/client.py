"""KVClient: the public API. Batches calls, tracks the caller's leases, picks a transport.

Every method takes a batch; a single block is a batch of one. The control plane
(lookup, leases, commits) goes over gRPC, or over the server's local control socket
when the server is on this host (kvclient/local_control.py: ~0.09 ms a Lookup instead
of gRPC's ~0.7); payload moves through the transport chosen at connect time.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

import grpc
import numpy as np

from kvclient.errors import CapacityExhaustedError, InvalidRequestError, PermissionDeniedError, from_rpc_error
from kvwire.keys import BlockKey, Fingerprint, block_keys
from kvclient.lease_keeper import LeaseKeeper
from kvclient.transports import device
from kvclient.transports.base import TransferStats, Transport
from kvwire.types import BlockState, KeyStatus, LeaseInfo, LeaseOutcome, PutOutcome, Tier
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:7480"
WAIT_POLL_S = (0.02, 0.5)  # first and longest pause between lookups when the server will not block a Wait
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def _digests(keys: Iterable[BlockKey | bytes]) -> list[bytes]:
    return [k.digest if isinstance(k, BlockKey) else bytes(k) for k in keys]


class KVClient:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        fingerprint: Fingerprint | None = None,
        tenant: str | None = None,
        token: str | None = None,
        transport: str = "auto",
        timeout_s: float = 30.0,
        tls_ca: str | None = None,
        local_control: bool = True,
    ) -> None:
        if fingerprint is None:
            raise InvalidRequestError("KVClient needs a Fingerprint: blocks are only shared between compatible engines")
        self.address = address
        self.fingerprint = fingerprint
        self.fingerprint_id = fingerprint.id
        self.tenant = tenant
        self.timeout_s = timeout_s
        self.client_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        md = [("kvstore-client-id", self.client_id)]
        if tenant:
            md.append(("kvstore-tenant", tenant))
        if token:
            md.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(md)
        if tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=open(tls_ca, "rb").read())
            self._channel = grpc.secure_channel(address, creds, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.grpc_stub = pb_grpc.KVStoreStub(self._channel)
        # Replaced by a LocalControlStub (same call shape) when transport selection finds the server on
        # this host with a local control socket; streaming calls go to grpc_stub either way.
        self.stub = self.grpc_stub
        self.local_control = local_control
        self._lock = threading.Lock()
        self._leases: dict[bytes, int] = {}
        self.last_transfer = TransferStats()
        self.transport_choice = None  # set by transports.select: what was asked for, what was chosen, and why
        self.transport: Transport = self._select_transport(transport)

    # ---- plumbing -----------------------------------------------------------------

    def _call(self, method, request, stream: bool = False, timeout_s: float | None = None):
        """Every RPC goes through here: metadata, deadline, and status -> exception mapping."""
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        try:
            if stream:
                return self._drain(method(request, metadata=self._metadata, timeout=timeout))
            return method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    @staticmethod
    def _drain(responses):
        try:
            yield from responses
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _select_transport(self, choice: str) -> Transport:
        from kvclient.transports import select

        return select.choose(self, choice)

    def close(self) -> None:
        with self._lock:
            lease_ids = list(self._leases.values())
            self._leases.clear()
        if lease_ids:
            try:
                self._call(self.stub.ReleaseLeases, pb.ReleaseLeasesRequest(lease_ids=lease_ids), timeout_s=2)
            except Exception:  # the server reclaims them at TTL anyway
                pass
        self.transport.close()
        if self.stub is not self.grpc_stub:
            self.stub.close()
        self._channel.close()

    def __enter__(self) -> "KVClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- namespace and lookup ------------------------------------------------------

    def block_keys(self, token_ids: Sequence[int] | np.ndarray, extra_keys: Iterable[bytes] | None = None) -> list[BlockKey]:
        return block_keys(self.fingerprint, token_ids, self.tenant, extra_keys)

    def status(self, keys: Sequence[BlockKey]) -> tuple[list[KeyStatus], int]:
        resp = self._call(self.stub.Lookup, pb.LookupRequest(fingerprint_id=self.fingerprint_id, keys=_digests(keys)))
        statuses = [KeyStatus(BlockKey(s.key), BlockState(s.state), Tier(s.tier), s.size_bytes, s.lease_owner) for s in resp.statuses]
        return statuses, resp.prefix_length

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """How many leading blocks of this chain are present."""
        if not keys:
            return 0
        request = pb.LookupRequest(fingerprint_id=self.fingerprint_id, keys=_digests(keys), prefix_only=True)
        return self._call(self.stub.Lookup, request).prefix_length

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        if not keys:
            return []
        return [s.state == BlockState.PRESENT for s in self.status(keys)[0]]

    # ---- leases -------------------------------------------------------------------

    def acquire(self, keys: Sequence[BlockKey], ttl_s: float | None = None) -> list[LeaseInfo]:
        """Ask to be the one writer of each missing key. PENDING means someone else computes it."""
        resp = self._call(self.stub.AcquireLeases, pb.AcquireLeasesRequest(fingerprint_id=self.fingerprint_id, keys=_digests(keys), ttl_ms=int((ttl_s or 0) * 1000)))
        out = [LeaseInfo(BlockKey(l.key), LeaseOutcome(l.outcome), l.lease_id, l.owner, l.expires_unix_ms) for l in resp.leases]
        with self._lock:
            for info in out:
                if info.outcome == LeaseOutcome.GRANTED:
                    self._leases[info.key.digest] = info.lease_id
        return out

    def renew(self, keys: Sequence[BlockKey], ttl_s: float | None = None) -> list[int]:
        with self._lock:
            ids = [self._leases[k] for k in _digests(keys) if k in self._leases]
        resp = self._call(self.stub.RenewLeases, pb.RenewLeasesRequest(lease_ids=ids, ttl_ms=int((ttl_s or 0) * 1000)))
        return list(resp.expires_unix_ms)

    def keep_leases(self, keys: Sequence[BlockKey], ttl_s: float) -> LeaseKeeper:
        """Renew this client's leases on keys every ttl_s / 3 until the returned keeper is closed
        (use it as a context manager around computing the blocks). Keys it holds no lease on are ignored."""
        return LeaseKeeper(self, keys, ttl_s)

    def release(self, keys: Sequence[BlockKey]) -> int:
        """Give up leases without writing (e.g. the computation failed), so waiters can take over."""
        with self._lock:
            ids = [self._leases.pop(k) for k in _digests(keys) if k in self._leases]
        if not ids:
            return 0
        return self._call(self.stub.ReleaseLeases, pb.ReleaseLeasesRequest(lease_ids=ids)).released

    def wait(self, keys: Sequence[BlockKey], timeout_s: float) -> list[BlockState]:
        """Block until each key is committed or nobody holds its lease any more (or timeout).

        A server already blocking as many Waits as it allows (per tenant and in all) refuses
        more; the answer is then the same, found by polling lookups until the timeout.
        """
        deadline = time.monotonic() + timeout_s
        try:
            resp = self._call(
                self.stub.Wait,
                pb.WaitRequest(fingerprint_id=self.fingerprint_id, keys=_digests(keys), timeout_ms=int(timeout_s * 1000)),
                timeout_s=timeout_s + self.timeout_s,
            )
        except CapacityExhaustedError as err:
            log.debug("Wait refused (%s): polling lookups instead", err)
            return self._poll_until_settled(keys, deadline)
        return [BlockState(s.state) for s in resp.statuses]

    def _poll_until_settled(self, keys: Sequence[BlockKey], deadline: float) -> list[BlockState]:
        pause_s, longest_s = WAIT_POLL_S
        while True:
            states = [s.state for s in self.status(keys)[0]]
            left_s = deadline - time.monotonic()
            if BlockState.PENDING not in states or left_s <= 0:
                return states
            time.sleep(min(pause_s, left_s))
            pause_s = min(2 * pause_s, longest_s)

    # ---- data ---------------------------------------------------------------------

    def put(self, keys: Sequence[BlockKey], blocks: Sequence[Any], durable: bool = False) -> list[PutOutcome]:
        """Store blocks (bytes-like, numpy arrays or CPU torch tensors). durable=True waits for the SSD tier."""
        if len(keys) != len(blocks):
            raise InvalidRequestError(f"{len(keys)} keys but {len(blocks)} blocks")
        if not keys:
            return []
        digests = _digests(keys)
        stats = TransferStats()
        t0 = time.perf_counter()
        device_ok = getattr(self.transport, "moves_device_memory", False)
        payloads = [device.readable(b, device_ok) for b in blocks]
        checksums = [device.checksum(p) for p in payloads]
        stats.validate_s += time.perf_counter() - t0
        outcomes = self.transport.put(digests, payloads, checksums, durable, stats)
        with self._lock:
            for d in digests:
                self._leases.pop(d, None)
        self.last_transfer = stats
        return [PutOutcome(o) for o in outcomes]

    def get(self, keys: Sequence[BlockKey], out: Sequence[Any] | None = None) -> list[np.ndarray]:
        """Fetch blocks byte-exact, as uint8 arrays (views of out's buffers when given).

        Raises BlockNotFoundError naming the missing keys; never returns partial data.
        """
        if out is not None and len(out) != len(keys):
            raise InvalidRequestError(f"{len(keys)} keys but {len(out)} output buffers")
        if not keys:
            return []
        device_ok = getattr(self.transport, "moves_device_memory", False)
        outs = [device.writable(o, device_ok) for o in out] if out is not None else None
        stats = TransferStats()
        result = self.transport.get(_digests(keys), outs, stats)
        self.last_transfer = stats
        return result

    def delete(self, keys: Sequence[BlockKey]) -> int:
        return self._call(self.stub.Delete, pb.DeleteRequest(fingerprint_id=self.fingerprint_id, keys=_digests(keys))).deleted

    def stats(self) -> dict:
        """This client's side ("client": the transport chosen and any fallback, the control path and why it
        is not the local one) and, for an admin token, the server's tiers, blocks, leases, pins and counters.
        A tenant's token gets the client part only: store-wide numbers would tell one tenant about another's activity."""
        out = {"client": self.transport_choice.as_dict() if self.transport_choice else {"transport": self.transport.name}}
        try:
            resp = self._call(self.stub.Stats, pb.StatsRequest())
        except PermissionDeniedError:
            return out
        return {
            "tiers": {Tier(t.tier).name.lower(): {"capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes, "blocks": t.blocks} for t in resp.tiers},
            "blocks": resp.blocks,
            "leases_held": resp.leases_held,
            "pins_held": resp.pins_held,
            "counters": dict(resp.counters),
            **out,
        }
