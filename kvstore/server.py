"""Assembles a running server: store, background worker, gRPC services, local control socket, signal handling.

Owns start-up and orderly shutdown; request behaviour lives in store.py and api.py, under every door.
Shutdown is bounded whatever clients do (shutdown_grace_s), and the host tier is flushed
even when gRPC has not finished stopping. Everything the server writes under its data
directory is the owner's alone: other local users must not read tenants' blocks.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore.admin_service import AdminServicer
from kvstore.api import StoreAPI
from kvstore.audit import AuditLog
from kvstore.auth import Authenticator
from kvstore.config import ServerConfig
from kvstore.dataplane_ucx import UcxDataPlane
from kvstore.background import BackgroundWorker
from kvstore.local_control import LocalControlServer
from kvstore.metrics import Metrics
from kvstore.operations import Operations
from kvstore.service import GRPC_OPTIONS, KVStoreServicer, add_to_server
from kvstore.store import Store
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from kvwire.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

# After grace, gRPC cancels the calls still open; this long more for them to unwind before the
# flush goes ahead anyway (a Write whose chunk failed to parse leaves grpcio 1.85's stop unfinished).
CANCEL_WAIT_S = 2.0


def settle_heap() -> None:
    """Move everything alive once the server has started (modules, gRPC, UCX, the restored index) out of
    the garbage collector's sight (gc.freeze), after one full collection so no garbage is frozen with it.

    Why: requests allocate per key (a 512-key Lookup makes thousands of objects, more in cluster mode),
    so gen-2 collections come every few dozen requests, and each walked the whole heap: ~10 ms on a
    2-core box with just the server's imports, most of a fully remote lookup's p99. Done in every mode,
    so cluster-on and cluster-off numbers compare like with like. Frozen objects are still freed by
    reference counting; only cycles among them would stay, and start-up makes none that die."""
    gc.collect()
    gc.freeze()


def make_data_dir_private(data_path: Path) -> None:
    """Files and directories created from now on are owner-only (umask 077, process-wide), and those
    an older version left readable are tightened: LMDB and the audit log hold tenants' data."""
    os.umask(0o077)
    data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, mode in ((data_path, 0o700), (data_path / "ssd", 0o700), (data_path / "ssd" / "data.mdb", 0o600),
                       (data_path / "ssd" / "lock.mdb", 0o600), (data_path / "audit.log", 0o600)):
        if path.exists() and not path.is_symlink():
            os.chmod(path, mode)


class KVStoreServer:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.auth = Authenticator.from_file(cfg.insecure_no_auth, cfg.tokens_file, cfg.peer_tokens_file)
        make_data_dir_private(cfg.data_path)
        self.store = Store(cfg)
        self.worker = BackgroundWorker(self.store)
        self.metrics = Metrics(self.store, cfg.listen.rsplit(":", 1)[0].strip("[]"), cfg.metrics_port, self.auth)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.grpc_workers, thread_name_prefix="kvstore-rpc"), interceptors=[self.metrics.interceptor], options=GRPC_OPTIONS
        )
        self.api = StoreAPI(self.store)
        self.servicer = KVStoreServicer(self.api, self.auth)
        add_to_server(self.servicer, self.grpc)
        self.ops = Operations(self.store)
        self.admin = AdminServicer(self.api, self.ops, self.auth, AuditLog(cfg.data_path / "audit.log"), self.drain)
        apb_grpc.add_AdminServicer_to_server(self.admin, self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = [pb.DESCRIPTOR.services_by_name["KVStore"].full_name, apb.DESCRIPTOR.services_by_name["Admin"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = self._bind()
        self.cluster = None  # cluster mode (docs/cluster.md): the node's peer service shares this gRPC port
        if cfg.cluster_etcd:
            from kvstore.cluster.node import ClusterNode
            from kvstore.cluster.peer_service import SERVICE_NAME as PEER_SERVICE

            self.cluster = ClusterNode(cfg, self.store, self.api, self.ops, self.auth, self.grpc, self.address)
            self.admin.cluster = self.cluster
            self.metrics.registry.register(self.cluster.collector())
            names.append(PEER_SERVICE)
        reflection.enable_server_reflection(names, self.grpc)
        self._stopped = threading.Event()
        self._exit = threading.Event()
        self.ucx: UcxDataPlane | None = None
        self.local: LocalControlServer | None = None

    def _bind(self) -> int:
        if self.cfg.tls_cert and self.cfg.tls_key:
            creds = grpc.ssl_server_credentials([(Path(self.cfg.tls_key).read_bytes(), Path(self.cfg.tls_cert).read_bytes())])
            port = self.grpc.add_secure_port(self.cfg.listen, creds)
        else:
            port = self.grpc.add_insecure_port(self.cfg.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.cfg.listen}")
        return port

    @property
    def address(self) -> str:
        host = self.cfg.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> "KVStoreServer":
        # Before gRPC answers: a client that asks DataPlane must find the UCX listener already up.
        self.ucx = UcxDataPlane.start_if_available(self.api, self.cfg.ucx_port) if self.cfg.ucx else None
        self.api.ucx = self.ucx
        if self.cfg.local_control:  # likewise the local control socket it advertises
            self.local = LocalControlServer.start_if_possible(self.api, self.auth, self.cfg.local_control_path,
                                                              self.metrics.interceptor.observe_local,
                                                              self.cfg.local_control_max_connections,
                                                              self.cfg.local_control_idle_s, self.cfg.local_control_read_s,
                                                              self.cfg.local_control_busy_poll_us / 1e6)
            self.api.local_control_path = self.local.path if self.local is not None else ""
        self.grpc.start()
        self.worker.start()
        self.metrics.start()
        if self.cluster is not None:  # joins once peers can reach this node's gRPC port
            self.cluster.start(self.ucx)
        settle_heap()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("kvstore.v1.KVStore", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "kvstore serving on %s: host tier %d MiB (shm %s), ssd tier %d MiB at %s, %d blocks restored",
            self.address,
            self.store.host.capacity_bytes >> 20,
            self.store.host.shm_name or "-",
            self.cfg.ssd_capacity >> 20,
            self.cfg.data_path / "ssd",
            len(self.store.index),
        )
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Calls in progress get grace_s (default shutdown_grace_s) to finish, then are cancelled; the host
        tier is flushed to LMDB after at most CANCEL_WAIT_S more, whether or not gRPC has stopped."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace_s = self.cfg.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace_s + CANCEL_WAIT_S
        self.health.enter_graceful_shutdown()
        self.store.admitting = False
        if self.cluster is not None:  # leave at once: peers stop sending here within a watch event
            self.cluster.leave()
        stopped = self.grpc.stop(grace_s)
        if self.local is not None:  # drains alongside gRPC, within the same grace period
            self.local.stop(grace_s)
        if not stopped.wait(max(0.0, deadline - time.monotonic())):
            log.warning("gRPC has not stopped %.1f s after shutdown began (calls left open); flushing anyway", grace_s + CANCEL_WAIT_S)
        if self.ucx is not None:
            self.ucx.stop()
        if self.cluster is not None:
            self.cluster.close()
        self.metrics.stop()
        self.worker.stop()
        self.store.close()
        log.info("kvstore stopped")

    def serve_forever(self) -> None:
        """Serve until SIGTERM, SIGINT or a drain; returns once the store is flushed and closed."""
        done = self._exit

        def on_signal(signum, _frame) -> None:
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        done.wait()
        self.stop()

    def drain(self, wait_s: float, handoff: bool = False) -> apb.DrainResponse:
        """Leave the cluster (in cluster mode), admit no writes, give readers and lease holders up to wait_s to finish,
        flush the host tier, then exit. With handoff (cluster mode), writes stop first and the blocks no other node
        holds are moved to peers before this node leaves."""
        handed_off = failed = 0
        if handoff and self.cluster is not None:
            self.store.admitting = False
            handed_off, failed = self.cluster.handoff()
        if self.cluster is not None:
            self.cluster.leave()
        self.store.admitting = False
        self.health.enter_graceful_shutdown()
        left = self.ops.wait_quiet(wait_s)
        flushed = self.store.flush_to_ssd()
        self.store.ssd.sync()
        log.info("drained: %d blocks flushed to ssd, %d readers left; exiting", flushed, left)
        self._exit.set()  # serve_forever stops the server; its grace period lets this answer go out
        return apb.DrainResponse(flushed_blocks=flushed, readers_left=left, handed_off=handed_off, handoff_failed=failed)
