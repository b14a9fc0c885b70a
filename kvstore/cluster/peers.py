"""Calls to other nodes: one gRPC channel per peer, a deadline on every call, and a circuit breaker per peer.

Owns the client half of PeerService (peer.proto): the envelope every call carries, the peer-role
token, turning answers into directory records and failures into kvwire errors, and who is worth
calling at all. It refuses to decide what to call (announcer.py, remote_tier.py do).

Why a breaker: a peer that stops answering without closing its connections (SIGSTOP, a silent
partition) makes every call to it wait out its whole deadline. One timeout, or three errors in a
row, opens the peer's breaker for OPEN_S; calls to it then fail at once, so readers move on to
another holder or a miss in microseconds instead of a deadline each (Mooncake#2039, #2704). After
OPEN_S one probe call is let through; its success closes the breaker.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import grpc

from kvwire.defaults import AUTH_METADATA, MAX_MESSAGE_BYTES
from kvwire.errors import ERROR_TYPE_METADATA, KVStoreError, UnavailableError, error_for
from kvwire.types import LeaseOutcome
from kvstore.counters import Event
from kvstore.cluster.claim_table import ClaimAnswer
from kvstore.cluster.directory import AnnounceResult, BlockRef, HolderId, Locations
from kvstore.cluster.replicator import CopyGroup
from kvstore.cluster.view import ClusterView, Member
from kvwire.v1 import peer_pb2 as ppb
from kvwire.v1 import peer_pb2_grpc as ppb_grpc

log = logging.getLogger(__name__)

OPEN_S = 5.0  # an open breaker refuses calls this long, then lets one probe through
ERRORS_TO_OPEN = 3  # consecutive errors that open a breaker (one timeout opens it at once)
RESYNC_CHUNK_BLOCKS = 4096
CALL_THREADS = 16  # standing threads for the second and later calls of a fan-out (_unary_many)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A peer that died is found by the calls' deadlines; reconnect fast once it is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Answers that say the peer is fine and the question was the problem: they never count against it.
_NOT_THE_PEERS_FAULT = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class Breaker:
    """closed -> (one timeout, or ERRORS_TO_OPEN errors in a row) -> open for OPEN_S -> half_open: one probe -> closed or open."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if self.clock() - self.opened_at < OPEN_S or self._probing else "half_open"

    def allow(self) -> bool:
        """Whether a call may go out now; in half_open, True once (the probe)."""
        with self._lock:
            if self.opened_at is None:
                return True
            if self.clock() - self.opened_at < OPEN_S or self._probing:
                return False
            self._probing = True
            return True

    def would_allow(self) -> bool:
        """allow() without taking the probe: is the peer worth naming to a reader?"""
        with self._lock:
            return self.opened_at is None or (self.clock() - self.opened_at >= OPEN_S and not self._probing)

    def succeeded(self) -> None:
        with self._lock:
            self.failures, self.opened_at, self._probing = 0, None, False

    def failed(self, timeout: bool) -> bool:
        """Record a failure; True when it opened (or re-opened) the breaker."""
        with self._lock:
            self.failures += 1
            if timeout or self.failures >= ERRORS_TO_OPEN or self._probing:
                self.opened_at, self._probing = self.clock(), False
                return True
            return False


@dataclass(frozen=True, slots=True)
class Fetched:
    """One block of a Fetch answer; missing: the holder has not got it (the stream ends there)."""

    skey: bytes
    data: bytes
    checksum: int
    missing: bool = False


@dataclass
class _Peer:
    member: Member
    channel: grpc.Channel
    stub: ppb_grpc.PeerServiceStub
    breaker: Breaker
    bytes_fetched: int = 0


def _error(err: grpc.RpcError) -> KVStoreError:
    type_name = dict(err.trailing_metadata() or ()).get(ERROR_TYPE_METADATA, "")
    return error_for(err.code().name, type_name, err.details() or "")


def envelope(sender: str, incarnation: int, view: ClusterView, target: Member) -> ppb.Envelope:
    return ppb.Envelope(sender=sender, sender_incarnation=incarnation, sender_view_revision=view.revision,
                        target_incarnation=target.incarnation)


def block_refs(refs: Sequence[BlockRef]) -> list[ppb.BlockRef]:
    return [ppb.BlockRef(skey=r.skey, fingerprint_id=r.fingerprint_id, size_bytes=r.size, checksum=r.checksum) for r in refs]


def located(response: ppb.LocateResponse) -> Locations:
    """The answer's columns; rows with the same holder mask share one holder tuple."""
    holders = [(h.node, h.incarnation) for h in response.holders]
    masks = list(response.holder_masks)
    sets = {mask: tuple(h for bit, h in enumerate(holders) if mask >> bit & 1) for mask in set(masks)}
    return Locations(list(response.found), list(response.sizes), list(response.checksums), [sets[m] for m in masks])


class Peers:
    """Channels and breakers for every other live member; calls carry this node's envelope and peer token."""

    def __init__(self, me: str, identity: Callable[[], tuple[int, ClusterView]], token: str, counters: Counter) -> None:
        """identity(): (this node's incarnation, 0 while not joined or fenced; its current view)."""
        self.me = me
        self.identity = identity
        self.metadata = ((AUTH_METADATA, f"Bearer {token}"),) if token else ()
        self.counters = counters
        self._peers: dict[str, _Peer] = {}
        self._served: Counter[str] = Counter()  # payload bytes this node's peer service sent each peer
        self._lock = threading.Lock()
        self._calls = ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix="kvstore-peer-call")

    # ---- who -------------------------------------------------------------------------------

    def _peer(self, name: str, view: ClusterView) -> _Peer:
        member = view.members.get(name)
        if member is None:
            raise UnavailableError(f"node {name} is not a member of the cluster now")
        with self._lock:
            peer = self._peers.get(name)
            if peer is not None and peer.member.grpc_address != member.grpc_address:
                peer.channel.close()
                peer = None
            if peer is None:
                channel = grpc.insecure_channel(member.grpc_address, options=CHANNEL_OPTIONS)
                peer = self._peers[name] = _Peer(member, channel, ppb_grpc.PeerServiceStub(channel), Breaker())
            elif peer.member.incarnation != member.incarnation:
                peer.breaker = Breaker()  # a new incarnation starts with a clean record
            peer.member = member
            return peer

    def usable(self, name: str) -> bool:
        """Worth naming as a holder: a member whose breaker is not open."""
        peer = self._peers.get(name)
        return peer is None or peer.breaker.would_allow()

    def on_view(self, view: ClusterView) -> None:
        """Close the channels of members that left."""
        with self._lock:
            for name in [n for n in self._peers if n not in view.members]:
                self._peers.pop(name).channel.close()

    def _begin(self, name: str) -> tuple[_Peer, ppb.Envelope]:
        incarnation, view = self.identity()
        if incarnation == 0:
            raise UnavailableError("this node is not a live member of the cluster (fenced or not joined)")
        peer = self._peer(name, view)
        if not peer.breaker.allow():
            self.counters[Event.PEER_CALLS_SHORT_CIRCUITED] += 1
            raise UnavailableError(f"node {name}'s circuit breaker is open")
        return peer, envelope(self.me, incarnation, view, peer.member)

    def _failed(self, peer: _Peer, err: grpc.RpcError, landed: bool = False) -> KVStoreError:
        """Book a failed call on the peer's breaker (unless the peer answered fine); the domain error to raise.
        landed: bytes had arrived, so a deadline is ours running out, not the peer going silent."""
        code = err.code()
        if code not in _NOT_THE_PEERS_FAULT:
            timeout = code == grpc.StatusCode.DEADLINE_EXCEEDED and not landed
            if peer.breaker.failed(timeout):
                self.counters[Event.PEER_BREAKER_OPENS] += 1
                log.info("circuit breaker for node %s opened (%s)", peer.member.name, code.name)
        else:
            peer.breaker.succeeded()
        return _error(err)

    # ---- calls -----------------------------------------------------------------------------

    def _unary_many(self, calls: list[tuple[str, _Peer, Callable, Any]], timeout_s: float) -> Iterator[tuple[str, _Peer, Any]]:
        """Make unary calls (name, peer, stub method, request) at once, each with timeout_s: the last in this thread,
        the others on this node's peer-call threads, all as blocking calls. Yields (name, peer, the response, a
        grpc.RpcError, or a KVStoreError for a call never sent).

        Why not gRPC futures: a future is completed by the channel's spin thread, which gRPC starts anew whenever
        a channel goes from no calls in flight to one, so each call paid a thread start and two GIL handoffs. On
        this 2-core box two Announce futures took 1.3 ms at p50 and 3-7 ms at p90; a blocking call here and one on
        a standing thread, 0.86 ms and 1.0 ms. A call queued behind busy threads past its deadline is not sent
        (and not held against the peer)."""
        deadline = time.monotonic() + timeout_s

        def call(method: Callable, request: Any) -> Any:
            left = deadline - time.monotonic()
            if left <= 0:
                return UnavailableError("the peer call waited for a thread past its deadline and was not sent")
            try:
                return method(request, timeout=left, metadata=self.metadata)
            except grpc.RpcError as err:
                return err

        others = []
        for name, peer, method, request in calls[:-1]:
            try:
                others.append((name, peer, self._calls.submit(call, method, request)))
            except RuntimeError:  # closed
                others.append((name, peer, None))
        if calls:
            name, peer, method, request = calls[-1]
            yield name, peer, call(method, request)
        for name, peer, future in others:
            try:
                answer = future.result() if future is not None else None
            except CancelledError:
                answer = None
            yield name, peer, UnavailableError("this node's peer calls were closed") if answer is None else answer

    def _fan_out(self, asks: dict[str, Any], method: str, request: Callable[[ppb.Envelope, Any], Any],
                 parse: Callable[[Any], Any], timeout_s: float) -> dict[str, Any]:
        """One unary call per named peer, all at once (_unary_many): request(envelope, ask) builds each, parse reads
        each answer. Each peer's parsed answer, or the KVStoreError its call failed with (or was never sent with:
        fenced, breaker open), booked on its breaker."""
        calls = []
        out: dict[str, Any] = {}
        for name, ask in asks.items():
            try:
                peer, env = self._begin(name)
            except KVStoreError as err:
                out[name] = err
                continue
            calls.append((name, peer, getattr(peer.stub, method), request(env, ask)))
        for name, peer, answer in self._unary_many(calls, timeout_s):
            if isinstance(answer, KVStoreError):
                out[name] = answer
            elif isinstance(answer, grpc.RpcError):
                out[name] = self._failed(peer, answer)
            else:
                peer.breaker.succeeded()
                out[name] = parse(answer)
        return out

    def locate_many(self, fingerprint_id: bytes, asks: dict[str, list[bytes]], timeout_s: float) -> dict[str, Locations | KVStoreError]:
        """Locate at several homes at once; each answer or the error it failed with."""
        return self._fan_out(asks, "Locate", lambda env, skeys: ppb.LocateRequest(envelope=env, fingerprint_id=fingerprint_id, skeys=skeys),
                             located, timeout_s)

    def fetch(self, name: str, fingerprint_id: bytes, skeys: Sequence[bytes], timeout_s: float) -> Iterator[list[Fetched]]:
        """The holder's blocks of skeys, a message at a time, in order; raises the call's error when it breaks
        (after yielding what arrived). The generator's close cancels the call."""
        peer, env = self._begin(name)
        call = peer.stub.Fetch(ppb.FetchRequest(envelope=env, fingerprint_id=fingerprint_id, skeys=skeys),
                               timeout=timeout_s, metadata=self.metadata)
        landed = False
        try:
            for response in call:
                landed = True
                blocks = [Fetched(b.skey, b.data, b.checksum, b.missing) for b in response.blocks]
                peer.bytes_fetched += sum(len(b.data) for b in blocks)
                yield blocks
            peer.breaker.succeeded()
        except grpc.RpcError as err:
            raise self._failed(peer, err, landed) from None
        finally:
            call.cancel()

    def note_fetched(self, name: str, size_bytes: int) -> None:
        """Bytes fetched from a peer outside the gRPC Fetch (the UCX data path), so per-peer bytes count both."""
        with self._lock:
            peer = self._peers.get(name)
        if peer is not None:
            peer.bytes_fetched += size_bytes

    def announce_many(self, batches: dict[str, tuple[int, Sequence[BlockRef], Sequence[bytes]]], timeout_s: float) -> dict[str, AnnounceResult | KVStoreError]:
        """Send each home its numbered batch (sequence, stored, removed) at once; each answer or the error."""
        def request(env: ppb.Envelope, batch: tuple[int, Sequence[BlockRef], Sequence[bytes]]) -> ppb.AnnounceRequest:
            sequence, stored, removed = batch
            return ppb.AnnounceRequest(envelope=env, sequence=sequence, stored=block_refs(stored), removed=list(removed))

        return self._fan_out(batches, "Announce", request,
                             lambda answer: AnnounceResult(not answer.resync_needed, answer.expected_sequence), timeout_s)

    def repair(self, home: str, holder: HolderId, skeys: Sequence[bytes], timeout_s: float) -> None:
        """Tell a home that holder answered not-found for skeys (lazy repair); best effort, errors raised."""
        peer, env = self._begin(home)
        request = ppb.AnnounceRequest(envelope=env, removed=list(skeys), repair_holder=holder[0], repair_incarnation=holder[1])
        try:
            peer.stub.Announce(request, timeout=timeout_s, metadata=self.metadata)
            peer.breaker.succeeded()
        except grpc.RpcError as err:
            raise self._failed(peer, err) from None

    def resync(self, home: str, next_sequence: int, blocks: Sequence[BlockRef], timeout_s: float) -> int:
        """Replace what home has from this holder incarnation with blocks (streamed in chunks); entries it now holds."""
        peer, env = self._begin(home)

        def chunks() -> Iterator[ppb.ResyncChunk]:
            yield ppb.ResyncChunk(envelope=env, next_sequence=next_sequence, blocks=block_refs(blocks[:RESYNC_CHUNK_BLOCKS]))
            for start in range(RESYNC_CHUNK_BLOCKS, len(blocks), RESYNC_CHUNK_BLOCKS):
                yield ppb.ResyncChunk(blocks=block_refs(blocks[start : start + RESYNC_CHUNK_BLOCKS]))

        try:
            answer = peer.stub.Resync(chunks(), timeout=timeout_s, metadata=self.metadata)
            peer.breaker.succeeded()
            return answer.entries
        except grpc.RpcError as err:
            raise self._failed(peer, err) from None

    def claim_many(self, fingerprint_id: bytes, asks: dict[str, tuple[list[bytes], list[int]]], ttl_s: float,
                   timeout_s: float) -> dict[str, list[ClaimAnswer] | KVStoreError]:
        """Claim keys at their first homes at once (asks: home -> (skeys, this node's lease ids)); each answer or its error."""
        def request(env: ppb.Envelope, ask: tuple[list[bytes], list[int]]) -> ppb.ClaimRequest:
            skeys, lease_ids = ask
            return ppb.ClaimRequest(envelope=env, fingerprint_id=fingerprint_id, skeys=skeys, lease_ids=lease_ids,
                                    ttl_ms=max(1, int(ttl_s * 1000)))

        return self._fan_out(asks, "Claim", request, lambda answer: [
            ClaimAnswer(LeaseOutcome(o), h, ms / 1000) for o, h, ms in zip(answer.outcomes, answer.holders, answer.expires_in_ms)],
            timeout_s)

    def release_claims(self, home: str, skeys: Sequence[bytes], lease_ids: Sequence[int], timeout_s: float) -> int:
        """End this node's claims of skeys made by these leases at their home; raises the call's error."""
        peer, env = self._begin(home)
        try:
            answer = peer.stub.ReleaseClaims(ppb.ReleaseClaimsRequest(envelope=env, skeys=skeys, lease_ids=lease_ids),
                                             timeout=timeout_s, metadata=self.metadata)
            peer.breaker.succeeded()
            return answer.released
        except grpc.RpcError as err:
            raise self._failed(peer, err) from None

    def wait_claims_many(self, asks: dict[str, list[bytes]], wait_s: float, timeout_s: float) -> dict[str, list[tuple[int, float]] | KVStoreError]:
        """Long-poll homes (asks: home -> skeys) until none of the keys is claimed, wait_s at most (the home answers
        then; timeout_s, a little longer, is the call's deadline); each home's (position, seconds until it lapses)
        of keys still claimed, or its error."""
        return self._fan_out(asks, "WaitClaims",
                             lambda env, skeys: ppb.WaitClaimsRequest(envelope=env, skeys=skeys, timeout_ms=int(wait_s * 1000)),
                             lambda answer: [(i, ms / 1000) for i, ms in zip(answer.pending, answer.expires_in_ms)], timeout_s)

    def ucx_session(self, name: str, tenant: str, timeout_s: float) -> tuple[str, bytes, str]:
        """(listener, token, client id) of a session on the peer's UCX data plane for tenant's blocks; listener "" without one."""
        peer, env = self._begin(name)
        try:
            answer = peer.stub.UcxSession(ppb.UcxSessionRequest(envelope=env, tenant=tenant), timeout=timeout_s, metadata=self.metadata)
            peer.breaker.succeeded()
            return answer.listener, answer.token, answer.client_id
        except grpc.RpcError as err:
            raise self._failed(peer, err) from None

    def copy_to(self, target: str, source: str, source_incarnation: int, origin: str, groups: Sequence[CopyGroup],
                timeout_s: float) -> tuple[list[int], int, int]:
        """Replicate at the target: take these groups from source. (per group, leading keys it holds; blocks it copied; their bytes)."""
        request = ppb.ReplicateRequest(source=source, source_incarnation=source_incarnation, origin=origin, groups=[
            ppb.CopyGroup(tenant=g.tenant, fingerprint_id=g.fingerprint_id, skeys=g.skeys, sizes=g.sizes, checksums=g.checksums)
            for g in groups])
        answer = self._replicate(target, request, timeout_s)
        return list(answer.held), answer.taken, answer.taken_bytes

    def copy_via(self, source: str, target: str, origin: str, skeys: Sequence[bytes], timeout_s: float) -> list[int]:
        """Replicate at the source: have target take these blocks from it. Per group it made, leading keys target holds."""
        return list(self._replicate(source, ppb.ReplicateRequest(target=target, origin=origin, skeys=list(skeys)), timeout_s).held)

    def _replicate(self, name: str, request: ppb.ReplicateRequest, timeout_s: float) -> ppb.ReplicateResponse:
        peer, env = self._begin(name)
        request.envelope.CopyFrom(env)
        try:
            answer = peer.stub.Replicate(request, timeout=timeout_s, metadata=self.metadata)
            peer.breaker.succeeded()
            return answer
        except grpc.RpcError as err:
            raise self._failed(peer, err, landed=True) from None  # a long copy running out of time is not a silent peer

    def status(self, name: str, timeout_s: float) -> ppb.ClusterStatus:
        peer, env = self._begin(name)
        try:
            answer = peer.stub.Status(ppb.PeerStatusRequest(envelope=env), timeout=timeout_s, metadata=self.metadata)
            peer.breaker.succeeded()
            return answer
        except grpc.RpcError as err:
            raise self._failed(peer, err) from None

    # ---- operators ---------------------------------------------------------------------------

    def count_served(self, name: str, nbytes: int) -> None:
        self._served[name] += nbytes

    def breakers(self) -> list[ppb.BreakerInfo]:
        """Every peer this node has called or served: its breaker and the payload bytes each way."""
        with self._lock:
            peers = dict(self._peers)
        out = []
        for name in sorted({*peers, *self._served}):
            peer = peers.get(name)
            out.append(ppb.BreakerInfo(peer=name, state=peer.breaker.state if peer else "closed", failures=peer.breaker.failures if peer else 0,
                                       bytes_fetched=peer.bytes_fetched if peer else 0, bytes_served=self._served[name]))
        return out

    def close(self) -> None:
        with self._lock:
            for peer in self._peers.values():
                peer.channel.close()
            self._peers.clear()
        self._calls.shutdown(wait=False, cancel_futures=True)
