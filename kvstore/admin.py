"""`kvstore-admin`: the operator's command line, a thin client of the Admin gRPC service.

Tables for people by default, `--json` for scripts (bytes as hex, enums by name).
Owns argument parsing and rendering only; every decision is the server's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvwire.defaults import DEFAULT_ADDRESS
from kvwire.errors import ERROR_TYPE_METADATA, KVStoreError, error_for
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from kvwire.v1 import kvstore_pb2 as pb

_TIERS = {"hbm": pb.TIER_HBM, "host": pb.TIER_HOST, "ssd": pb.TIER_SSD}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1d' or plain seconds -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 30s, 15m, 2h)")
    return float(m.group(1)) * _SECONDS[m.group(2) or "s"]


def hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not hex: {text!r}") from err


def hex_keys(text: str) -> list[bytes]:
    return [hex_bytes(k) for k in re.split(r"[,\s]+", text.strip()) if k]


def to_dict(msg: Message) -> dict[str, Any]:
    """A message as plain data for --json and tables: bytes as hex, enums by name, defaults included."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
            continue
        convert: Callable[[Any], Any] = lambda v: v  # noqa: E731
        if field.type == FieldDescriptor.TYPE_BYTES:
            convert = bytes.hex
        elif field.type == FieldDescriptor.TYPE_ENUM:
            convert = lambda v, e=field.enum_type: e.values_by_number[v].name if v in e.values_by_number else v  # noqa: E731
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            convert = to_dict
        is_repeated = getattr(field, "is_repeated", None)
        repeated = is_repeated if isinstance(is_repeated, bool) else field.label == FieldDescriptor.LABEL_REPEATED
        out[field.name] = [convert(v) for v in value] if repeated else convert(value)
    return out


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _rate(hits: int, misses: int) -> str:
    return f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"


def render_stats(d: dict) -> str:
    s, c = d["store"], d["store"]["counters"]
    tiers = [
        (t["tier"].removeprefix("TIER_").lower(), human_bytes(t["capacity_bytes"]), human_bytes(t["used_bytes"]), f"{100 * t['used_bytes'] / max(t['capacity_bytes'], 1):.1f}%", t["blocks"])
        for t in s["tiers"]
    ]
    hits = c.get("hits_hbm", 0) + c.get("hits_host", 0) + c.get("hits_ssd", 0)
    hbm = any(t["tier"] == "TIER_HBM" for t in s["tiers"]) or any(k.startswith("hbm_") and v for k, v in c.items())
    summary = [
        ("blocks", s["blocks"]),
        ("leases held", s["leases_held"]),
        ("pins held", s["pins_held"]),
        ("get hit rate", f"{_rate(hits, c.get('misses', 0))} ({hits} hits: " + (f"{c.get('hits_hbm', 0)} hbm, " if hbm else "")
         + f"{c.get('hits_host', 0)} host, {c.get('hits_ssd', 0)} ssd; {c.get('misses', 0)} misses)"),
        ("lookup hit rate", _rate(c.get("lookup_blocks_hit", 0), c.get("lookup_blocks_miss", 0))),
        ("evictions", f"{c.get('evictions', 0)} capacity, {c.get('admin_evictions', 0)} admin"),
        ("demotions", c.get("demotions", 0)),
        ("checksum failures", c.get("checksum_failures", 0)),
        ("draining", "yes" if d["draining"] else "no"),
    ]
    if hbm:
        summary.insert(-2, ("hbm tier", f"{c.get('hbm_promotions', 0)} promoted, {c.get('hbm_evictions', 0)} dropped, "
                                        f"{c.get('hbm_verify_failures', 0)} failed their check, {c.get('hbm_device_errors', 0)} device errors"
                                        + ("" if any(t["tier"] == "TIER_HBM" for t in s["tiers"]) else " (tier lost)")))
    parts = [table(("TIER", "CAPACITY", "USED", "USE", "BLOCKS"), tiers), "", table(("", ""), summary).split("\n", 1)[1]]
    if d["tenants"]:
        parts += ["", table(("TENANT", "BLOCKS", "BYTES"), [(t["tenant"], t["blocks"], human_bytes(t["bytes"])) for t in d["tenants"]])]
    return "\n".join(parts)


def render_blocks(d: dict) -> str:
    rows = [
        (b["tenant"], b["fingerprint_id"][:12], b["key"], b["tier"].removeprefix("TIER_").lower() + ("+ssd" if b["on_ssd"] and b["tier"] != "TIER_SSD" else ""), human_bytes(b["size_bytes"]), b["pins"], f"{b['age_ms'] / 1000:.0f}s")
        for b in d["blocks"]
    ]
    out = table(("TENANT", "FINGERPRINT", "KEY", "TIER", "SIZE", "PINS", "AGE"), rows)
    out += f"\n{len(rows)} of {d['matched']} matching blocks"
    if d["next_page_token"]:
        out += f"; next page: --page-token {d['next_page_token']}"
    return out


def render_leases(d: dict) -> str:
    now_ms = time.time() * 1000
    rows = [
        (l["id"], l["kind"], l["tenant"], l["owner"], len(l["keys"]), (l["keys"][0][:16] + "…") if l["keys"] else "", human_bytes(l["size_bytes"]), f"{(l['expires_unix_ms'] - now_ms) / 1000:.1f}s")
        for l in d["leases"]
    ]
    return table(("ID", "KIND", "TENANT", "OWNER", "BLOCKS", "FIRST KEY", "SIZE", "EXPIRES IN"), rows)


def render_counts(d: dict) -> str:
    def shown(k: str, v: Any) -> Any:
        if isinstance(v, list):
            return ", ".join(map(str, v)) or "-"
        return human_bytes(v) if k.endswith("bytes") else v

    return table(("", ""), [(k.replace("_", " "), shown(k, v)) for k, v in d.items()]).split("\n", 1)[1]


def render_cluster(d: dict) -> str:
    """Every node's view of the cluster: one row a node, its members, then each node's peers (breakers, bytes)."""
    nodes = d["nodes"]
    rows = [(n["node"], n["incarnation"], n["state"], "yes" if n["fenced"] else "no", n["view_revision"], n["directory_entries"],
             n["directory_holders"], n["counters"].get("remote_fetch_blocks", 0), n["counters"].get("peer_served_blocks", 0),
             f"{human_bytes(n.get('free_bytes', 0))} of {human_bytes(n.get('capacity_bytes', 0))}",
             f"{n.get('replication_lag_p50_ms', 0):.1f} / {n.get('replication_lag_p99_ms', 0):.1f} ms", n.get("replication_pending", 0),
             f"{n['counters'].get('cluster_copies_sent', 0)} / {n['counters'].get('cluster_copies_taken', 0)}")
            for n in nodes]
    parts = [table(("NODE", "INCARNATION", "STATE", "FENCED", "VIEW REV", "DIR ENTRIES", "DIR HOLDERS", "FETCHED", "SERVED", "FREE",
                    "REPLICA LAG P50/P99", "UNPUSHED", "COPIES SENT/TAKEN"), rows)]
    if d["unreachable"]:
        parts.append("unreachable: " + ", ".join(d["unreachable"]))
    if nodes:
        members = [(m["name"], m["incarnation"], m["state"], m["grpc_address"], m["host_id"]) for m in nodes[0]["members"]]
        parts += ["", f"members as {nodes[0]['node']} sees them:", table(("MEMBER", "INCARNATION", "STATE", "ADDRESS", "HOST ID"), members)]
    peers = [(n["node"], p["peer"], p["state"], p["failures"], human_bytes(p["bytes_fetched"]), human_bytes(p["bytes_served"]))
             for n in nodes for p in n["peers"]]
    if peers:
        parts += ["", table(("NODE", "PEER", "BREAKER", "FAILURES", "FETCHED FROM", "SERVED TO"), peers)]
    return "\n".join(parts)


def selector(args: argparse.Namespace) -> apb.BlockSelector:
    return apb.BlockSelector(
        tenant=args.tenant or "",
        fingerprint_id=args.fingerprint or b"",
        tier=_TIERS.get(args.tier or "", pb.TIER_UNSPECIFIED),
        min_age_ms=int((args.older_than or 0) * 1000),
        keys=[k for group in args.chain or [] for k in group],
    )


def add_selector(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", help="only this tenant's blocks")
    p.add_argument("--fingerprint", type=hex_bytes, help="only blocks of this fingerprint id (hex)")
    p.add_argument("--tier", choices=sorted(_TIERS), help="only blocks whose fastest copy is in this tier")
    p.add_argument("--older-than", type=parse_duration, help="only blocks created at least this long ago (e.g. 15m)")
    p.add_argument("--chain", type=hex_keys, action="append", help="only these block keys: a key prefix chain, hex, comma separated (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore-admin", description="Operate a kvstore server through its Admin service")
    parser.add_argument("--server", default=os.environ.get("KVSTORE_SERVER", DEFAULT_ADDRESS), help="host:port (env KVSTORE_SERVER)")
    parser.add_argument("--token", default=os.environ.get("KVSTORE_TOKEN"), help="admin bearer token (env KVSTORE_TOKEN)")
    parser.add_argument("--tls-ca", help="PEM root certificate: connect with TLS")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    parser.add_argument("--timeout", type=parse_duration, default=120.0, help="RPC deadline (default 120s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="capacity and use per tier, block counts, hit rates, leases, evictions")
    ls = sub.add_parser("ls", help="list blocks, paged")
    add_selector(ls)
    ls.add_argument("--page-size", type=int, default=100)
    ls.add_argument("--page-token", default="")
    ev = sub.add_parser("evict", help="evict to a watermark, or every matching block; pinned blocks are never evicted")
    add_selector(ev)
    ev.add_argument("--watermark", type=float, default=0.0, help="evict LRU blocks of --tier (default host) until used <= this fraction of capacity "
                    "(hbm: only the HBM copies go)")
    rm = sub.add_parser("delete", help="delete matching blocks (pinned ones too, once their readers finish); in cluster mode "
                                       "a tenant, fingerprint or chain delete applies on every node and names those not yet confirmed")
    add_selector(rm)
    rm.add_argument("--secure", action="store_true", help="also scrub the host pool and rewrite the ssd tier so no copy can be recovered")
    leases = sub.add_parser("leases", help="list or revoke write leases and read pins")
    leases.add_argument("action", nargs="?", choices=("list", "revoke"), default="list")
    leases.add_argument("ids", nargs="*", type=int, help="lease or pin ids to revoke")
    leases.add_argument("--tenant", default="")
    leases.add_argument("--owner", default="", help="client id")
    cl = sub.add_parser("cluster", help="cluster mode: members, incarnations, states, directory shard sizes, breakers, per-peer bytes")
    cl.add_argument("--local", action="store_true", help="this node only (asks no peer)")
    drain = sub.add_parser("drain", help="stop admitting writes, let readers finish, flush to ssd, exit (in cluster mode: leave at once)")
    drain.add_argument("--reader-timeout", type=parse_duration, default=30.0, help="how long to wait for readers (default 30s)")
    drain.add_argument("--wait", action="store_true", help="return only once the server has stopped answering")
    drain.add_argument("--handoff", action="store_true", help="cluster mode: move the blocks no other node holds to peers first, then leave")
    return parser


def _run(args: argparse.Namespace, stub: apb_grpc.AdminStub, call: Callable) -> tuple[Message, Callable[[dict], str]]:
    if args.command == "stats":
        return call(stub.Stats, pb.StatsRequest()), render_stats
    if args.command == "ls":
        return call(stub.ListBlocks, apb.ListBlocksRequest(selector=selector(args), page_size=args.page_size, page_token=args.page_token)), render_blocks
    if args.command == "evict":
        tier = _TIERS.get(args.tier or "", pb.TIER_UNSPECIFIED) if args.watermark else pb.TIER_UNSPECIFIED
        return call(stub.Evict, apb.EvictRequest(selector=selector(args), watermark=args.watermark, tier=tier)), render_counts
    if args.command == "delete":
        return call(stub.DeleteBlocks, apb.DeleteBlocksRequest(selector=selector(args), secure=args.secure)), render_counts
    if args.command == "cluster":
        return call(stub.Cluster, apb.ClusterRequest(local_only=args.local)), render_cluster
    if args.command == "leases" and args.action == "revoke":
        return call(stub.RevokeLeases, apb.RevokeLeasesRequest(ids=args.ids, owner=args.owner, tenant=args.tenant)), render_counts
    if args.command == "leases":
        return call(stub.ListLeases, apb.ListLeasesRequest(tenant=args.tenant, owner=args.owner)), render_leases
    return call(stub.Drain, apb.DrainRequest(timeout_ms=int(args.reader_timeout * 1000), handoff=args.handoff)), render_counts


def _wait_gone(channel: grpc.Channel, timeout_s: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            channel = grpc.secure_channel(args.server, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(args.server)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()

    def call(method, request):
        return method(request, metadata=metadata, timeout=args.timeout)

    try:
        with channel:
            response, render = _run(args, apb_grpc.AdminStub(channel), call)
            if args.command == "drain" and args.wait:
                _wait_gone(channel, args.timeout)
    except grpc.RpcError as err:
        type_name = dict(err.trailing_metadata() or ()).get(ERROR_TYPE_METADATA, "")
        exc: KVStoreError = error_for(err.code().name, type_name, err.details())
        print(f"kvstore-admin: {type(exc).__name__} ({err.code().name}): {exc}", file=sys.stderr)
        return 1
    data = to_dict(response)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
