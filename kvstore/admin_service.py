"""The Admin gRPC servicer: translates operator RPCs to Operations calls and audits what changes.

Every RPC requires the admin role; errors map to gRPC status through service.py's
one table (its `rpc` decorator, as every KVStore call). Drain is handed back to the
server, which owns the process's lifetime.
"""
from __future__ import annotations

import functools
import time
from typing import Callable

from kvwire.errors import InvalidRequestError
from kvstore.api import StoreAPI
from kvstore.audit import AuditLog
from kvstore.auth import Authenticator
from kvstore.operations import DeleteReport, EvictReport, Operations, Selector
from kvstore.rpc_codec import stats_response
from kvstore.service import rpc
from kvstore.store import Caller
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from kvwire.v1 import kvstore_pb2 as pb

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 10_000
DEFAULT_DRAIN_WAIT_S = 30.0


def _admin(method: Callable) -> Callable:
    @functools.wraps(method)
    def handler(self: "AdminServicer", request, context, caller: Caller):
        Authenticator.require_admin(caller)
        return method(self, request, context, caller)

    return rpc(handler)


def selector(msg: apb.BlockSelector) -> Selector:
    return Selector(msg.tenant, msg.fingerprint_id, msg.tier, msg.min_age_ms / 1000, frozenset(msg.keys))


def _reader_wait(context) -> float | None:
    """How long a call may wait for readers (a secure delete's, a drain's): half of what is left of the caller's
    deadline, so the work after the wait (a scrub, a flush) still answers in time; None for a call without one."""
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining / 2)


def _described(sel: apb.BlockSelector) -> dict:
    """The selector as the audit log records it: hex for bytes, only what was set."""
    target = {"tenant": sel.tenant, "fingerprint": sel.fingerprint_id.hex(), "tier": pb.Tier.Name(sel.tier) if sel.tier else "", "min_age_ms": sel.min_age_ms}
    if sel.keys:
        target["keys"] = len(sel.keys)
    return {k: v for k, v in target.items() if v}


class AdminServicer(apb_grpc.AdminServicer):
    def __init__(self, api: StoreAPI, ops: Operations, auth: Authenticator, audit: AuditLog,
                 drain: Callable[[float, bool], apb.DrainResponse]) -> None:
        self.api = api
        self.ops = ops
        self.store = ops.store
        self.auth = auth
        self.audit = audit
        self.drain = drain
        self.cluster = None  # a ClusterNode in cluster mode (kvstore/cluster/node.py): deletes go cluster-wide

    @_admin
    def Stats(self, request, context, caller: Caller):
        tenants = [apb.TenantUsage(tenant=t, blocks=n, bytes=b) for t, n, b in self.ops.tenant_usage()]
        return apb.AdminStatsResponse(store=stats_response(self.api.stats(caller)), tenants=tenants, draining=not self.store.admitting)

    @_admin
    def ListBlocks(self, request, context, caller: Caller):
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        views, last, matched = self.ops.list_blocks(selector(request.selector), page_size, bytes.fromhex(request.page_token))
        blocks = [
            apb.BlockInfo(tenant=v.tenant, fingerprint_id=v.fingerprint_id, key=v.key, tier=v.tier, on_ssd=v.on_ssd, size_bytes=v.size, pins=v.pins, age_ms=int(v.age_s * 1000), idle_ms=int(v.idle_s * 1000))
            for v in views
        ]
        return apb.ListBlocksResponse(blocks=blocks, next_page_token=last.hex(), matched=matched)

    @_admin
    def Evict(self, request, context, caller: Caller):
        if request.watermark > 0:
            report: EvictReport = self.ops.evict_to_watermark(request.tier, request.watermark)
            target = {"tier": pb.Tier.Name(request.tier or pb.TIER_HOST), "watermark": request.watermark}
        else:
            report = self.ops.evict(selector(request.selector))
            target = _described(request.selector)
        self.audit.record(caller, "evict", target, evicted=report.evicted, demoted=report.demoted, bytes=report.bytes, skipped_pinned=report.skipped_pinned)
        return apb.EvictResponse(evicted=report.evicted, demoted=report.demoted, bytes=report.bytes, skipped_pinned=report.skipped_pinned)

    @_admin
    def DeleteBlocks(self, request, context, caller: Caller):
        cluster_wide, late = False, []
        reader_wait_s = _reader_wait(context)
        if self.cluster is not None:
            report, cluster_wide, late = self.cluster.delete(selector(request.selector), request.secure, reader_wait_s)
        else:
            report: DeleteReport = self.ops.delete(selector(request.selector), request.secure, reader_wait_s)
        action = "delete_secure" if request.secure else "delete"
        self.audit.record(caller, action, _described(request.selector), deleted=report.deleted, bytes=report.bytes, pending_pinned=report.pending_pinned,
                          **({"cluster_wide": True, "unconfirmed_nodes": late} if cluster_wide else {}))
        return apb.DeleteBlocksResponse(
            deleted=report.deleted,
            bytes=report.bytes,
            pending_pinned=report.pending_pinned,
            scrubbed_host_bytes=report.scrubbed_host_bytes,
            ssd_bytes_rewritten=report.ssd_bytes_rewritten,
            cluster_wide=cluster_wide,
            unconfirmed_nodes=late,
        )

    @_admin
    def Cluster(self, request, context, caller: Caller):
        if self.cluster is None:
            raise InvalidRequestError("this server does not run in cluster mode (no cluster_etcd)")
        nodes, unreachable = ([self.cluster.status()], []) if request.local_only else self.cluster.statuses()
        return apb.ClusterResponse(nodes=nodes, unreachable=unreachable)

    @_admin
    def ListLeases(self, request, context, caller: Caller):
        leases = [
            apb.LeaseEntry(id=v.id, kind=v.kind, owner=v.owner, tenant=v.tenant, fingerprint_id=v.fingerprint_id, keys=list(v.keys), expires_unix_ms=v.expires_unix_ms, size_bytes=v.size)
            for v in self.ops.leases(request.tenant, request.owner)
        ]
        return apb.ListLeasesResponse(leases=leases)

    @_admin
    def RevokeLeases(self, request, context, caller: Caller):
        leases, pins = self.ops.revoke(set(request.ids), request.owner, request.tenant)
        target = {k: v for k, v in {"ids": list(request.ids), "owner": request.owner, "tenant": request.tenant}.items() if v}
        self.audit.record(caller, "revoke", target, leases=leases, pins=pins)
        return apb.RevokeLeasesResponse(leases=leases, pins=pins)

    @_admin
    def Drain(self, request, context, caller: Caller):
        started = time.monotonic()
        self.audit.record(caller, "drain", {"timeout_ms": request.timeout_ms, **({"handoff": True} if request.handoff else {})})
        if request.handoff and self.cluster is None:
            raise InvalidRequestError("drain --handoff needs cluster mode (cluster_etcd): there is no peer to hand blocks to")
        wait_s = request.timeout_ms / 1000 if request.timeout_ms else DEFAULT_DRAIN_WAIT_S
        within_deadline = _reader_wait(context)
        response = self.drain(wait_s if within_deadline is None else min(wait_s, within_deadline), request.handoff)
        response.waited_ms = int((time.monotonic() - started) * 1000)
        self.audit.record(caller, "drained", {}, flushed_blocks=response.flushed_blocks, readers_left=response.readers_left)
        return response
