"""ServerConfig: the one configuration dataclass, filled defaults -> TOML -> KVSTORE_* env -> flags.

Owns parsing of sizes ("1GiB") and precedence; it does not know what the values do.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from kvstore.tiers.slab import slab_bytes_for
from kvwire.defaults import DEFAULT_ADDRESS as DEFAULT_LISTEN, LOCAL_CONTROL_MAX_CONNECTIONS

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(value: str | int) -> int:
    """'512MiB' -> 536870912; plain integers are bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 4GiB, 1000000)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: str = ".kvstore-data"
    host_memory: int = 1 << 30
    ssd_capacity: int = 16 << 30
    max_block_bytes: int = 16 << 20
    lease_ttl_s: float = 10.0
    pin_ttl_s: float = 30.0
    high_watermark: float = 0.90
    low_watermark: float = 0.70
    persist_on_shutdown: bool = True
    grpc_workers: int = 32
    log_level: str = "INFO"
    metrics_port: int = 0
    insecure_no_auth: bool = False
    tokens_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    ucx: bool = True
    ucx_port: int = 0
    ucx_all_interfaces: bool = False  # ucxx listens on every interface: allow that when listen is a loopback address
    shm: bool = True
    local_control: bool = True  # serve same-host clients' unary calls on a Unix socket (kvstore/local_control.py)
    local_control_socket: str = ""  # its path; "" is <data_dir>/control.sock
    local_control_max_connections: int = LOCAL_CONTROL_MAX_CONNECTIONS  # a server thread each; calls beyond go over gRPC
    local_control_idle_s: float = 300.0  # a connection with no call for this long is closed (the client reconnects)
    local_control_read_s: float = 10.0  # a started frame must arrive within this; a stalled peer is dropped
    # After answering, a connection thread polls for its next call this long before it blocks (GIL released, at most
    # a quarter of the cores at once): an engine calling every few ms skips the reader's wakeup. Costs that core's time.
    local_control_busy_poll_us: int = 0
    # Limits that keep one caller from holding the whole server (docs/security.md).
    max_keys_per_request: int = 65536  # keys, lease ids or pin ids one request may name
    max_wait_s: float = 60.0  # a Wait blocks at most this long, whatever timeout it asks for
    max_waits_per_tenant: int = 8  # concurrent Waits per tenant; more are RESOURCE_EXHAUSTED
    max_lease_ttl_s: float = 300.0  # longest TTL a lease or pin may ask for
    tenant_held_fraction: float = 0.5  # host pool share one non-admin tenant may hold reserved or pinned
    tenant_max_held_ids: int = 65536  # leases plus pins one non-admin tenant may hold
    stale_write_quarantine_s: float = 30.0  # an expired lease's slot is not reused for this long
    shutdown_grace_s: float = 5.0  # SIGTERM: how long calls in progress may finish before the flush
    # HBM tier (docs/hbm.md): off unless hbm_memory > 0 and CUDA is present.
    hbm_memory: int = 0  # bytes of one device allocation on GPU `gpu`, carved like the host pool
    gpu: int = 0  # CUDA device index of the HBM pool
    hbm_promote_hits: int = 2  # reads within hbm_promote_window_s that make a host block hot
    hbm_promote_window_s: float = 60.0
    hbm_backend: str = "cuda"  # "host": host memory stands in for the GPU (the tier's logic without one; exports nothing)
    # Cluster (docs/cluster.md): off unless cluster_etcd names etcd endpoints.
    cluster_etcd: str = ""  # HOST:PORT[,HOST:PORT...] of a real etcd cluster
    cluster_name: str = "kvstore"  # etcd key prefix /kvstore/<cluster_name>/; nodes of one cluster share it
    node_name: str = ""  # unique in the cluster; "" is the host name
    advertise: str = ""  # HOST:PORT peers dial for this node's gRPC; "" is listen (must not be 0.0.0.0 then)
    host_id: str = ""  # overrides the detected host identity (co-location); also KVSTORE_HOST_ID for clients
    cluster_lease_ttl_s: float = 5.0  # membership lease; a silent node is gone from every view after this
    cluster_strict_fence: bool = False  # a fenced node refuses local reads too (deletes must hold everywhere)
    remote_fetch_deadline_ms: int = 1000  # a remote prefix fetch returns the leading run that landed by then
    cluster_announce_wait_ms: int = 50  # a commit waits this long for its directory home's ack before answering
    peer_tokens_file: str = ""  # TOML [[peers]] token entries; nodes present one to each other (peer role)
    peer_max_inflight: int = 8  # transfers this node sends peers at once; past it a peer is told to ask another holder
    hot_threshold: float = 32.0  # a key Located this often (decayed, half-life 10 s) at its home is pushed to more nodes; 0: never
    hot_replicas: int = 3  # a hot key is pushed until this many nodes hold it (its next HRW nodes)
    cluster_replicas: int = 1  # copies of each commit batch: R-1 are pushed to other nodes; the directory repairs below R
    cluster_copy_rate_mb_s: float = 64.0  # per node: repair, spill and requested copies send at most this (MB/s)

    def validate(self) -> "ServerConfig":
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise ValueError("need 0 < low_watermark < high_watermark <= 1")
        if self.max_block_bytes > self.host_memory:
            raise ValueError("max_block_bytes larger than host_memory")
        if self.lease_ttl_s <= 0 or self.pin_ttl_s <= 0:
            raise ValueError("lease_ttl_s and pin_ttl_s must be positive")
        if not 0 < self.tenant_held_fraction <= 1:
            raise ValueError("tenant_held_fraction must be in (0, 1]")
        if self.cluster_copy_rate_mb_s <= 0:
            raise ValueError("cluster_copy_rate_mb_s must be positive")
        for name in ("max_keys_per_request", "max_waits_per_tenant", "tenant_max_held_ids", "cluster_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_wait_s", "max_lease_ttl_s", "local_control_idle_s", "local_control_read_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.stale_write_quarantine_s < 0:
            raise ValueError("stale_write_quarantine_s must not be negative")
        if self.hbm_memory < 0 or self.gpu < 0 or self.hbm_promote_hits < 1 or self.hbm_promote_window_s <= 0:
            raise ValueError("hbm_memory and gpu must not be negative, hbm_promote_hits at least 1, hbm_promote_window_s positive")
        slab_bytes = slab_bytes_for(self.max_block_bytes)  # the HBM tier is carved in slabs like the host pool
        if 0 < self.hbm_memory < slab_bytes:
            raise ValueError(f"hbm_memory must hold at least one slab of {slab_bytes} bytes (max_block_bytes rounded up to a power of two)")
        if self.hbm_backend not in ("cuda", "host"):
            raise ValueError(f"hbm_backend must be cuda or host; got {self.hbm_backend!r}")
        if self.peer_max_inflight < 1 or self.hot_replicas < 1 or self.hot_threshold < 0:
            raise ValueError("peer_max_inflight and hot_replicas must be at least 1, hot_threshold not negative")
        if not 0 <= self.local_control_busy_poll_us <= 1_000_000:
            raise ValueError("local_control_busy_poll_us must be between 0 (off) and 1000000 (one second)")
        if self.local_control_max_connections < 1:
            raise ValueError("local_control_max_connections must be at least 1 (turn the socket off with local_control = false)")
        return self

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def local_control_path(self) -> Path:
        """Absolute: it is advertised to clients, whose working directory is not the server's."""
        return Path(self.local_control_socket or self.data_path / "control.sock").absolute()


_SIZE_FIELDS = {"host_memory", "ssd_capacity", "max_block_bytes", "hbm_memory"}


def _coerce(name: str, kind: Any, value: Any) -> Any:
    if name in _SIZE_FIELDS:
        return parse_size(value)
    if kind in (bool, "bool"):
        if isinstance(value, bool):
            return value
        return str(value).strip().lower() in ("1", "true", "yes", "on")
    if kind in (int, "int"):
        return int(value)
    if kind in (float, "float"):
        return float(value)
    return str(value)


def _apply(cfg: ServerConfig, values: Mapping[str, Any], source: str) -> None:
    known = {f.name: f.type for f in fields(ServerConfig)}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{source}: unknown setting {key!r}")
        setattr(cfg, name, _coerce(name, known[name], value))


def load_config(config_file: str | None = None, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None) -> ServerConfig:
    cfg = ServerConfig()
    env = os.environ if env is None else env
    config_file = config_file or env.get("KVSTORE_CONFIG")
    if config_file:
        doc = tomllib.loads(Path(config_file).read_text())
        _apply(cfg, doc.get("server", doc), f"config file {config_file}")
    prefix = "KVSTORE_"
    names = {f.name for f in fields(ServerConfig)}
    env_values = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix) and k[len(prefix) :].lower() in names}
    _apply(cfg, env_values, "environment")
    _apply(cfg, {k: v for k, v in (flags or {}).items() if v is not None}, "flags")
    return cfg.validate()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are None so that unset flags never override TOML or env."""
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f"(default: {f.default})")


def to_dict(cfg: ServerConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
