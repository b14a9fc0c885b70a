"""The scheduler half: which of a request's prompt blocks to load from kvstore, wait for, or compute and save.

For each new request it leases the prompt's missing full blocks (one Acquire over all its keys;
GRANTED means this engine computes and saves the block, PENDING means another request is
computing it, ALREADY_PRESENT that it is stored). Pending blocks before the request's first
lease (and not in vLLM's own prefix cache) are waited for, as the bundled engines do
(docs/engine-adapter.md, `claim`), but without
blocking vLLM: `get_num_new_matched_tokens` answers None ("ask again next step") until they land,
their holder vanishes (its lease is then acquired again) or `wait_timeout_s` runs out. The store
sees one owner per engine (its client), so two requests of this engine wanting the same block
are told apart here: the first owns it, the second waits for it like any other. Then it
pins the loadable leading run (so nothing is evicted before the worker reads it) and promises
those tokens. Each step it tells the worker which pages to load and which of its leased
blocks were completed by that step and must be saved. It never touches KV bytes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from connectors.vllm.metadata import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from connectors.session import StoreSession
from engines.adapter import leading_present, loadable_blocks
from kvwire.keys import BlockKey, block_keys
from kvwire.types import BlockState, LeaseOutcome

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

WAIT_SLICE_S = 0.02  # one blocking Wait per scheduler step while requests wait: no busy loop, little delay to others


@dataclass
class RequestClaim:
    """One request's prompt blocks as the store sees them, and what this engine owes the store for them."""

    request: "Request"
    keys: list[BlockKey]
    deadline: float
    present: set[int] = field(default_factory=set)
    granted: set[int] = field(default_factory=set)  # under this engine's write leases, not saved yet
    settled: bool = False
    waited: bool = False
    num_pinned: int = 0  # leading blocks pinned for loading
    pin_ref: int = 0
    local_tokens: int = 0  # vLLM's own prefix-cache hit at the last lookup (block aligned)
    keeper: object | None = None  # the LeaseKeeper renewing `granted`


def prompt_keys(session: StoreSession, request: "Request") -> list[BlockKey]:
    """The chained keys of the prompt's full blocks. vLLM's cache salt (its per-user prefix-cache
    isolation) is folded into the first block, so the chain differs wherever the salt does.
    Requests whose KV depends on more than the tokens (LoRA, multimodal inputs, prompt embeddings) get none."""
    if request.prompt_token_ids is None or request.lora_request is not None or request.mm_features:
        return []
    fp = session.fingerprint
    full = len(request.prompt_token_ids) // fp.block_tokens
    if full == 0:
        return []
    extras = [b""] * full
    if request.cache_salt:
        extras[0] = b"vllm-cache-salt\x00" + request.cache_salt.encode()
    return block_keys(fp, request.prompt_token_ids, session.settings.tenant, extras)


class SchedulerSide:
    def __init__(self, session: StoreSession) -> None:
        self.session = session
        self.block_tokens = session.fingerprint.block_tokens
        self._claims: dict[str, RequestClaim] = {}
        self._loads: list[LoadSpec] = []
        self._waited_this_step = False
        self._kv_cache_manager: "KVCacheManager | None" = None
        self._owners: dict[bytes, str] = {}  # block key digest -> the request of this engine computing it
        self._saved_last_step: list[BlockKey] = []
        self._pins_last_step: list[int] = []

    def bind(self, kv_cache_manager: "KVCacheManager") -> None:
        self._kv_cache_manager = kv_cache_manager

    # ---- get_num_new_matched_tokens ---------------------------------------------------

    def matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        t0 = time.perf_counter()
        try:
            return self._matched_tokens(request, num_computed_tokens)
        finally:
            self.session.stats.lookup_s += time.perf_counter() - t0

    def _matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        claim = self._claims.get(request.request_id)
        if claim is None:
            keys = prompt_keys(self.session, request)
            if not keys:
                return 0, False
            claim = RequestClaim(request, keys, time.monotonic() + self.session.settings.wait_timeout_s)
            self._claims[request.request_id] = claim
            self.session.stats.requests_looked_up += 1
        if not claim.settled and not self._advance(claim, num_computed_tokens // self.block_tokens):
            return None, False
        claim.local_tokens = num_computed_tokens
        tokens = loadable_blocks(claim.num_pinned, request.num_prompt_tokens, self.block_tokens) * self.block_tokens
        if tokens <= num_computed_tokens:
            return 0, False
        self.session.stats.tokens_matched += tokens - num_computed_tokens
        return tokens - num_computed_tokens, False

    def _advance(self, claim: RequestClaim, local_blocks: int) -> bool:
        """One round of leasing (and a short wait); True once the claim is settled.

        Blocks [0, local_blocks) are in vLLM's own prefix cache: never waited for, but saved
        from there when this request owns them."""
        ask = [i for i in range(len(claim.keys)) if i not in claim.present and i not in claim.granted]
        if ask:
            infos = self.session.call("acquire", lambda c: c.acquire([claim.keys[i] for i in ask], self.session.settings.lease_ttl_s), None)
            if infos is None:  # no store: compute everything, owe nothing
                claim.present.clear()
                claim.granted.clear()
                claim.settled = True
                return True
            for i, info in zip(ask, infos):
                if info.outcome == LeaseOutcome.ALREADY_PRESENT:
                    claim.present.add(i)
                elif info.outcome == LeaseOutcome.GRANTED:
                    owner = self._owners.setdefault(claim.keys[i].digest, claim.request.request_id)
                    if owner == claim.request.request_id:
                        claim.granted.add(i)
        head = min(claim.granted, default=len(claim.keys))
        pending = [claim.keys[i] for i in range(local_blocks, head) if i not in claim.present]
        if pending and time.monotonic() < claim.deadline:
            if not claim.waited:
                claim.waited = True
                self.session.stats.requests_waited += 1
            if not self._waited_this_step:
                self._waited_this_step = True
                self.session.call("wait", lambda c: c.wait(pending, WAIT_SLICE_S), None)
            return False
        self._settle(claim)
        return True

    def _settle(self, claim: RequestClaim) -> None:
        claim.settled = True
        num_present = leading_present([BlockState.PRESENT if i in claim.present else BlockState.MISSING
                                       for i in range(len(claim.keys))])
        if claim.granted:
            owned = [claim.keys[i] for i in sorted(claim.granted)]
            self.session.stats.blocks_leased += len(owned)
            claim.keeper = self.session.call("keep leases", lambda c: c.keep_leases(owned, self.session.settings.lease_ttl_s), None)
        num_load = loadable_blocks(num_present, claim.request.num_prompt_tokens, self.block_tokens)
        if num_load:
            pinned = self.session.call("pin", lambda c: c.pin(claim.keys[:num_load], prefix=True), None)
            if pinned is not None and len(pinned):
                claim.num_pinned = len(pinned)
                claim.pin_ref = self.session.hold_pin(pinned)
            elif pinned is not None:
                pinned.release()

    # ---- update_state_after_alloc / build_connector_meta --------------------------------

    def after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        claim = self._claims.get(request.request_id)
        if claim is None:
            return
        if num_external_tokens <= 0:
            self._drop_pin(claim)
            return
        first = claim.local_tokens // self.block_tokens
        last = first + num_external_tokens // self.block_tokens
        block_ids = blocks.get_block_ids()[0][first:last]
        self._loads.append(LoadSpec(request.request_id, claim.keys[first:last], list(block_ids), claim.pin_ref, first))
        claim.pin_ref = 0  # the worker releases it after reading

    def build_meta(self, scheduler_output: "SchedulerOutput") -> KVStoreConnectorMetadata:
        self._settle_last_step()
        meta = KVStoreConnectorMetadata(loads=self._loads)
        self._pins_last_step = [load.pin_ref for load in self._loads if load.pin_ref]
        self._loads = []
        self._waited_this_step = False
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            claim = self._claims.get(req_id)
            if claim is None or not claim.granted:
                continue
            request = claim.request
            done_blocks = min(request.num_computed_tokens + num_tokens, request.num_prompt_tokens) // self.block_tokens
            ready = sorted(i for i in claim.granted if i < done_blocks)
            if not ready:
                continue
            assert self._kv_cache_manager is not None
            block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
            saved = [claim.keys[i] for i in ready]
            meta.saves.append(SaveSpec(req_id, saved, [block_ids[i] for i in ready], self.session.client_id or ""))
            self._saved_last_step.extend(saved)
            claim.granted.difference_update(ready)
            for key in saved:
                self._owners.pop(key.digest, None)
            self._stop_keeper(claim)
            if claim.granted:  # renew only what is still to be written: a committed lease cannot be renewed
                remaining = [claim.keys[i] for i in sorted(claim.granted)]
                claim.keeper = self.session.call("keep leases", lambda c: c.keep_leases(remaining, self.session.settings.lease_ttl_s), None)
        return meta

    def _settle_last_step(self) -> None:
        """The worker has run the last step: drop what it left behind.

        Releasing the keys it was told to save forgets their leases here (the worker committed
        them, possibly from its own process) or, where its write failed, hands them to waiters at
        once. A pin it did not take (it runs in another process and read with get()) is dropped."""
        saved, self._saved_last_step = self._saved_last_step, []
        if saved:
            self.session.call("release", lambda c: c.release(saved), 0)
        pins, self._pins_last_step = self._pins_last_step, []
        for pin_ref in pins:
            pinned = self.session.take_pin(pin_ref)
            if pinned is not None:
                pinned.release()

    # ---- request_finished --------------------------------------------------------------

    def finished(self, request: "Request") -> None:
        claim = self._claims.pop(request.request_id, None)
        if claim is None:
            return
        self._stop_keeper(claim)
        self._drop_pin(claim)
        if claim.granted:  # leased, never computed (aborted, or cut short): let waiters take over at once
            unsaved = [claim.keys[i] for i in sorted(claim.granted)]
            for key in unsaved:
                self._owners.pop(key.digest, None)
            self.session.call("release", lambda c: c.release(unsaved), 0)

    def _stop_keeper(self, claim: RequestClaim) -> None:
        if claim.keeper is not None:
            claim.keeper.close()
            claim.keeper = None

    def _drop_pin(self, claim: RequestClaim) -> None:
        if claim.pin_ref:
            pinned = self.session.take_pin(claim.pin_ref)
            claim.pin_ref = 0
            if pinned is not None:
                pinned.release()

    def close(self) -> None:
        for claim in list(self._claims.values()):
            self.finished(claim.request)
