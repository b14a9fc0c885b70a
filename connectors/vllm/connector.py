"""KVStoreConnector: vLLM's KV connector (v1) backed by kvstore.

Load it with

    KVTransferConfig(kv_connector="KVStoreConnector", kv_connector_module_path="connectors.vllm",
                     kv_role="kv_both", kv_connector_extra_config={"address": "127.0.0.1:7480"})

vLLM builds one instance per role in the same process (single-rank executors): the scheduler's
decides what to load, wait for and save (scheduler.py), the worker's moves the bytes
(worker.py), and both reach kvstore through one shared session (session.py), because the
store knows a write lease's owner by its client id. This module only routes vLLM's calls.
Multi-rank executors (tensor or pipeline parallel) put the halves in different processes and
are refused at start-up rather than half-supported.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from connectors.vllm.fingerprint import UnsupportedConfigError, vllm_fingerprint
from connectors.vllm.metadata import KVStoreConnectorMetadata
from connectors.vllm.scheduler import SchedulerSide
from connectors.session import session_for
from connectors.vllm.settings import ConnectorSettings
from connectors.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class KVStoreConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST  # kvstore serves loads from its host pool (promoting from SSD first)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save lost to preemption is a later miss, not a broken hand-off

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.world_size > 1:
            raise UnsupportedConfigError(f"kvstore connector runs with one rank (tensor x pipeline parallel = {parallel.world_size}): "
                                         "the lease-holding scheduler and the saving worker must share a process")
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            # A cache, not a hand-off: a block that fails its checksum or vanished is computed again,
            # never a failed request. vLLM reads this right after building the scheduler's connector.
            log.info("kvstore connector: kv_load_failure_policy %r -> 'recompute'", self._kv_transfer_config.kv_load_failure_policy)
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        settings = ConnectorSettings.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self.fingerprint = vllm_fingerprint(vllm_config, kv_cache_config, settings)
        self.session = session_for(settings, self.fingerprint)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.session)
        else:
            self._worker = WorkerSide(self.session, kv_cache_config.kv_cache_groups[0].layer_names, settings.layout == "canonical")
        log.info("kvstore connector (%s) for %s at %s, fingerprint %s", role.name.lower(), self.fingerprint.model,
                 settings.address, self.fingerprint.id_hex)

    # ---- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        layers = self._vllm_config.compilation_config.static_forward_context
        backends = {name: layers[name].attn_backend.get_name() for name in kv_caches
                    if name in layers and hasattr(layers[name], "attn_backend")}
        self._worker.register(kv_caches, backends)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv has loaded every layer (synchronous loads)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        return  # whole blocks are saved after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.save(self._metadata())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.failed_block_ids() if self._worker is not None else set()

    def _metadata(self) -> KVStoreConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        return meta

    # ---- scheduler side ----------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: "KVCacheManager") -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.bind(kv_cache_manager)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        self._scheduler.finished(request)
        return False, None

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        self.session.close()
