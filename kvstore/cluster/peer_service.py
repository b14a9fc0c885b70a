"""The server half of PeerService: what one node answers other nodes, behind the peer credential and the envelope check.

Owns admission of node-to-node calls (the peer-role token, then the fencing rules below) and the
answers: Locate and Announce/Resync from this node's directory shard, Fetch from its store by
storage key, Replicate through the node's replicator (replicator.py), Status from the node. It refuses policy: what a shard keeps is directory.py's, what a
store holds is the store's.

Fencing, in order (design/cluster.md §3.3):
  - this node is fenced (its lease may be gone): UNAVAILABLE, since what it knows may be stale;
  - the call names another incarnation of this node: FAILED_PRECONDITION (the caller's view is old);
  - the sender is not live under the incarnation it claims: if this node's view has seen everything
    the sender's had (view revision) or a newer incarnation of it, the call is a zombie's (a fenced or
    restarted node's queued call) and is refused, counted; else wait up to VIEW_CATCH_UP_S for the
    watch to catch up, then decide.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import Counter
from typing import Callable, Iterator, Protocol, Sequence

import grpc

from kvwire.errors import FencedError, InvalidRequestError, KVStoreError, PermissionDeniedError, StaleViewError
from kvstore.api import UcxSessions
from kvstore.auth import Authenticator, check_tenant
from kvstore.counters import Event
from kvstore.cluster.claim_table import ClaimTable
from kvstore.cluster.claims import presence
from kvstore.cluster.directory import BlockRef, DirectoryShard, HolderId, Locations, live_holders
from kvstore.cluster.hot import HotSpread
from kvstore.cluster.peers import Peers
from kvstore.cluster.replicator import CopyGroup
from kvstore.cluster.transfer_cap import PeerTransfers, Served
from kvstore.cluster.view import ClusterView
from kvstore.service import abort
from kvstore.store import Caller, Store
from kvwire.v1 import peer_pb2 as ppb
from kvwire.v1 import peer_pb2_grpc as ppb_grpc

log = logging.getLogger(__name__)

VIEW_CATCH_UP_S = 1.0
PEER_CLIENT_PREFIX = "peer:"  # client ids of UCX sessions issued to peers: a fenced node refuses them (node.before_read)
FETCH_MESSAGE_BYTES = 1 << 20  # a Fetch answers in messages of about this much payload: a deadline keeps what landed
# (4 MiB messages landed nothing by a 1 s deadline over a 20 Mbit/s link; 1 MiB ones were as fast on loopback, within noise)
MAX_CLAIM_WAIT_MS = 10_000  # a WaitClaims long-poll holds one of this node's threads this long at most
# Peers' WaitClaims long-polls this node lets block at once, each holding one of its gRPC threads (32 by default):
# past that, one answers at once and its asker polls, so peers' waits can never take the threads its clients need.
CLAIM_WAITS_SERVED = 8
MAX_CLAIM_TTL_MS = 600_000  # a claim lapses after this long at most, whatever the lease asked
SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["PeerService"].full_name


class MembershipView(Protocol):
    """What admission needs of membership.py's Membership."""

    @property
    def incarnation(self) -> int: ...

    @property
    def fenced(self) -> bool: ...

    def view(self) -> ClusterView: ...

    def wait_view(self, predicate: Callable[[ClusterView], bool], timeout_s: float) -> bool: ...


def _peer_call(method: Callable) -> Callable:
    """Authenticate the peer, admit its envelope (the first chunk's, for a stream), answer; errors to status once."""
    name = method.__name__

    def refuse(self: "PeerServicer", context: grpc.ServicerContext, err: Exception):
        if not isinstance(err, KVStoreError):
            log.error("peer call %s failed unexpectedly", name, exc_info=err)
            err = KVStoreError(f"internal error in {name}; the server log has details")
        abort(context, err)

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self: "PeerServicer", request, context):
            try:
                self.auth.require_peer(context.invocation_metadata())
                self.admit(request.envelope)
                yield from method(self, request, context)
            except grpc.RpcError:
                raise
            except Exception as err:
                refuse(self, context, err)

        return streaming

    @functools.wraps(method)
    def unary(self: "PeerServicer", request, context):
        try:
            self.auth.require_peer(context.invocation_metadata())
            self.admit(request.envelope)
            return method(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as err:
            refuse(self, context, err)

    return unary


class PeerServicer(ppb_grpc.PeerServiceServicer):
    def __init__(self, me: str, membership: MembershipView, auth: Authenticator, shard: DirectoryShard, hot: HotSpread,
                 store: Store, peers: Peers, transfers: PeerTransfers, counters: Counter, status: Callable[[], ppb.ClusterStatus]) -> None:
        """hot: the shard's Locate answers, ordered by holder load (hot.py); transfers: the cap on what this node sends peers at once."""
        self.me = me
        self.membership = membership
        self.auth = auth
        self.shard = shard
        self.hot = hot
        self.transfers = transfers
        self.store = store
        self.peers = peers
        self.counters = counters
        self.status = status
        self.ucx: UcxSessions | None = None  # the server's UCX data plane, once started (node.start)
        self.ucx_listener = ""  # host:port peers dial for it
        self.replicator = None  # replicator.Replicator (node.py): answers Replicate
        self.claims = ClaimTable()  # the write claims of keys this node is first home for (node.py shares it)
        self._claim_waits = threading.BoundedSemaphore(CLAIM_WAITS_SERVED)

    def add_to(self, server: grpc.Server) -> None:
        ppb_grpc.add_PeerServiceServicer_to_server(self, server)

    # ---- admission ---------------------------------------------------------------------------

    def admit(self, env: ppb.Envelope) -> None:
        membership = self.membership
        mine = membership.incarnation
        if membership.fenced or mine == 0:
            self.counters[Event.PEER_REJECTED_FENCED] += 1
            raise FencedError(f"node {self.me} is fenced (not a live member) and serves no peer until it rejoins")
        if env.target_incarnation != mine:
            self.counters[Event.PEER_REJECTED_STALE_VIEW] += 1
            raise StaleViewError(f"the call names incarnation {env.target_incarnation} of node {self.me}; it is {mine} now")
        if membership.view().is_live(env.sender, env.sender_incarnation):
            return

        def settled(view: ClusterView) -> bool:
            return view.is_live(env.sender, env.sender_incarnation) or view.revision >= env.sender_view_revision \
                or view.incarnation_of(env.sender) > env.sender_incarnation

        if not settled(membership.view()):
            membership.wait_view(settled, VIEW_CATCH_UP_S)
        if not membership.view().is_live(env.sender, env.sender_incarnation):
            self.counters[Event.PEER_REJECTED_ZOMBIE] += 1
            raise PermissionDeniedError(f"node {env.sender} incarnation {env.sender_incarnation} is not a live member (a zombie call)")

    # ---- directory ----------------------------------------------------------------------------

    @_peer_call
    def Locate(self, request: ppb.LocateRequest, context) -> ppb.LocateResponse:
        found, order = self.hot.answer(request.fingerprint_id, request.skeys, live_holders(self.membership.view()))
        self.counters[Event.DIRECTORY_LOCATES] += 1
        return locate_response(found, order)

    @_peer_call
    def Announce(self, request: ppb.AnnounceRequest, context) -> ppb.AnnounceResponse:
        env = request.envelope
        if request.repair_holder:  # a reader's lazy repair, not the holder's own numbered batch
            repaired = self.shard.repair((request.repair_holder, request.repair_incarnation), request.removed)
            self.counters[Event.DIRECTORY_REPAIRS] += repaired
            return ppb.AnnounceResponse()
        stored = [BlockRef(r.skey, r.fingerprint_id, r.size_bytes, r.checksum) for r in request.stored]
        result = self.shard.announce((env.sender, env.sender_incarnation), request.sequence, stored, request.removed)
        if result.applied:
            self.counters[Event.DIRECTORY_ANNOUNCES] += 1
        else:
            self.counters[Event.DIRECTORY_RESYNCS_REQUESTED] += 1
        return ppb.AnnounceResponse(resync_needed=not result.applied, expected_sequence=result.expected_sequence)

    def Resync(self, request_iterator, context) -> ppb.ResyncResponse:
        """Client-streaming: the envelope of the first chunk is admitted, then the whole set replaces the holder's."""
        try:
            self.auth.require_peer(context.invocation_metadata())
            chunks = iter(request_iterator)
            first = next(chunks, None)
            if first is None:
                return ppb.ResyncResponse()
            self.admit(first.envelope)
            env = first.envelope
            blocks = [BlockRef(r.skey, r.fingerprint_id, r.size_bytes, r.checksum) for r in first.blocks]
            for chunk in chunks:
                blocks += [BlockRef(r.skey, r.fingerprint_id, r.size_bytes, r.checksum) for r in chunk.blocks]
            entries = self.shard.resync((env.sender, env.sender_incarnation), first.next_sequence, blocks)
            self.counters[Event.DIRECTORY_RESYNCS] += 1
            return ppb.ResyncResponse(entries=entries)
        except grpc.RpcError:
            raise
        except KVStoreError as err:
            abort(context, err)
        except Exception as err:
            log.error("peer call Resync failed unexpectedly", exc_info=err)
            abort(context, KVStoreError("internal error in Resync; the server log has details"))

    # ---- data -------------------------------------------------------------------------------

    @_peer_call
    def Fetch(self, request: ppb.FetchRequest, context) -> Iterator[ppb.FetchResponse]:
        """The blocks of the leading run this node holds, in order, then a `missing` marker where the run ended early."""
        with self.transfers.slot(request.envelope.sender) as count_served:  # PeerBusyError past peer_max_inflight
            yield from self._fetch(request, count_served)

    def _fetch(self, request: ppb.FetchRequest, count_served: Served) -> Iterator[ppb.FetchResponse]:
        skeys = list(request.skeys)
        sent = served = 0
        message, message_bytes, in_message = ppb.FetchResponse(), 0, 0
        blocks = self.store.read_stored(request.fingerprint_id, skeys)
        try:
            for _, data, checksum in blocks:
                message.blocks.append(ppb.FetchedBlock(skey=skeys[served + in_message], data=data, checksum=checksum))
                in_message += 1
                message_bytes += len(data)
                if message_bytes >= FETCH_MESSAGE_BYTES:
                    yield message
                    sent, served = sent + message_bytes, served + in_message
                    message, message_bytes, in_message = ppb.FetchResponse(), 0, 0
            if served + in_message < len(skeys):
                message.blocks.append(ppb.FetchedBlock(skey=skeys[served + in_message], missing=True))
                self.counters[Event.PEER_SERVED_NOT_FOUND] += 1
            if message.blocks:
                yield message
                sent, served = sent + message_bytes, served + in_message
        finally:  # the pins go now, and what was sent is counted, also when the reader went away midway
            blocks.close()
            count_served(served, sent)

    @_peer_call
    def UcxSession(self, request: ppb.UcxSessionRequest, context) -> ppb.UcxSessionResponse:
        """A session on this node's UCX data plane bound to the tenant the peer reads for (check_tenant: the same
        names a token may carry), under a peer client id: a peer acts for every tenant, as Fetch's storage keys do."""
        if self.ucx is None:
            return ppb.UcxSessionResponse()
        env = request.envelope
        client_id = f"{PEER_CLIENT_PREFIX}{env.sender}:{env.sender_incarnation}"
        token = self.ucx.session_token(Caller(tenant=check_tenant(request.tenant), client_id=client_id))
        return ppb.UcxSessionResponse(listener=self.ucx_listener, token=token, client_id=client_id)

    @_peer_call
    def Replicate(self, request: ppb.ReplicateRequest, context) -> ppb.ReplicateResponse:
        """Take copies of a peer's blocks, or (as their holder) have another node take them: replicator.py."""
        if self.replicator is None:
            raise FencedError(f"node {self.me} is not ready to take copies")
        if request.target and request.target != self.me:
            return ppb.ReplicateResponse(held=self.replicator.forward(request.target, list(request.skeys), request.origin))
        groups = [CopyGroup(g.tenant, g.fingerprint_id, tuple(g.skeys), tuple(g.sizes), tuple(g.checksums)) for g in request.groups]
        held, taken, taken_bytes = self.replicator.take(request.source or request.envelope.sender, request.source_incarnation,
                                                        request.origin, groups)
        return ppb.ReplicateResponse(held=held, taken=taken, taken_bytes=taken_bytes)

    @_peer_call
    def Status(self, request: ppb.PeerStatusRequest, context) -> ppb.ClusterStatus:
        return self.status()

    # ---- cluster-wide single writer (claim_table.py) -------------------------------------------

    @_peer_call
    def Claim(self, request: ppb.ClaimRequest, context) -> ppb.ClaimResponse:
        env = request.envelope
        if len(request.lease_ids) != len(request.skeys):
            raise InvalidRequestError(f"{len(request.skeys)} keys but {len(request.lease_ids)} lease ids")
        live = live_holders(self.membership.view())
        answers = self.claims.claim((env.sender, env.sender_incarnation), request.skeys, request.lease_ids,
                                    min(request.ttl_ms, MAX_CLAIM_TTL_MS) / 1000, live, presence(self.shard, request.fingerprint_id, live))
        return ppb.ClaimResponse(outcomes=[int(a.outcome) for a in answers], holders=[a.holder for a in answers],
                                 expires_in_ms=[max(0, int(a.expires_in_s * 1000)) for a in answers])

    @_peer_call
    def ReleaseClaims(self, request: ppb.ReleaseClaimsRequest, context) -> ppb.ReleaseClaimsResponse:
        env = request.envelope
        return ppb.ReleaseClaimsResponse(released=self.claims.release((env.sender, env.sender_incarnation), request.skeys, request.lease_ids))

    @_peer_call
    def WaitClaims(self, request: ppb.WaitClaimsRequest, context) -> ppb.WaitClaimsResponse:
        """A long-poll: answered once none of the keys is claimed, or at the timeout the caller set (bounded here)."""
        held = self._claim_waits.acquire(blocking=False)
        try:  # past CLAIM_WAITS_SERVED long-polls at once, the answer is what is claimed now (the asker polls)
            timeout_s = min(request.timeout_ms, MAX_CLAIM_WAIT_MS) / 1000 if held else 0.0
            claimed = self.claims.wait(list(request.skeys), timeout_s, lambda: live_holders(self.membership.view()), context.is_active)
        finally:
            if held:
                self._claim_waits.release()
        return ppb.WaitClaimsResponse(pending=[i for i, _ in claimed], expires_in_ms=[max(0, int(s * 1000)) for _, s in claimed])


def locate_response(found: Locations, order: Sequence[HolderId] = ()) -> ppb.LocateResponse:
    """A shard's answer as the wire's columns: holders named once, each key's as a bit mask over them.
    order: holders to name first, in this order (a reader rebuilds each key's holders in the order named:
    hot.py's least loaded first)."""
    bits: dict[tuple[str, int], int] = {holder: bit for bit, holder in enumerate(order[:64])}
    masks: dict[int, tuple[tuple, int]] = {}  # id(holder tuple) -> (it, its mask): the shard shares one per holder set
    holder_masks = []
    for holders in found.holders:
        known = masks.get(id(holders))
        if known is None or known[0] is not holders:
            mask = 0
            for holder in holders:
                bit = bits.get(holder)
                if bit is None:
                    if len(bits) == 64:
                        continue  # a hint only: more holders than a mask names are left out
                    bit = bits[holder] = len(bits)
                mask |= 1 << bit
            known = masks[id(holders)] = (holders, mask)
        holder_masks.append(known[1])
    response = ppb.LocateResponse(holders=[ppb.Holder(node=name, incarnation=inc) for (name, inc) in bits])
    if all(holder_masks):
        response.found.extend(found.positions)
        response.sizes.extend(found.sizes)
        response.checksums.extend(found.checksums)
        response.holder_masks.extend(holder_masks)
    else:  # keys whose every holder fell past the 64 named: left out
        rows = [row for row in zip(found.positions, found.sizes, found.checksums, holder_masks) if row[3]]
        for column, values in zip((response.found, response.sizes, response.checksums, response.holder_masks), zip(*rows)):
            column.extend(values)
    return response


def cluster_status(name: str, membership, shard: DirectoryShard, peers: Peers, counters: Counter,
                   tombstones_revision: int) -> ppb.ClusterStatus:
    """One node's ClusterStatus message: membership (a MembershipStatus, None before start), shard, breakers, counters."""
    counts = _copy(counters)
    status = ppb.ClusterStatus(node=name, directory_entries=len(shard), directory_holders=shard.holders, peers=peers.breakers(),
                               counters={str(e): int(counts.get(e, 0)) for e in _CLUSTER_EVENTS},
                               tombstones_applied_revision=tombstones_revision)
    if membership is not None:
        status.cluster, status.state, status.fenced = membership.cluster, membership.state, membership.fenced
        status.incarnation, status.view_revision, status.fence_in_s = membership.incarnation, membership.view_revision, membership.fence_in_s
        status.members.extend(ppb.MemberInfo(name=m.name, incarnation=m.incarnation, grpc_address=m.grpc_address, host_id=m.host_id,
                                             state=m.state) for m in membership.members)
    else:
        status.state, status.fenced = "joining", True
    return status


_CLUSTER_EVENTS = tuple(e for e in Event if e.value.startswith(("cluster_", "tombstones_", "remote_", "peer_", "directory_")))


def _copy(counters: Counter) -> dict:
    for _ in range(5):  # counters are bumped by other threads without a lock: retry a torn copy
        try:
            return dict(counters)
        except RuntimeError:
            continue
    return {}
