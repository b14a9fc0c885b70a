"""How much time-to-first-token does a stored prefix save? TTFT and tokens computed vs prefix-hit ratio.

    python bench/prefix_reuse.py                                  # CPU, small model, 1k/4k/8k
    python bench/prefix_reuse.py --quick                          # CPU smoke run
    python bench/prefix_reuse.py --device cuda --model-size 1b    # the GPU target: host and HBM tiers vs resident

For each context length and hit ratio, a fresh prompt's leading blocks are
first published to a real kvstore server (untimed); then TTFT is timed as a
prefill worker pays it: look up the prompt's blocks, load the present ones
through the StoreAdapter (on a GPU: pinned, then DMA'd from the store's pool
straight into the pages layer by layer while the forward pass runs), run the
rest of the prompt through the model, sample the first token and wait for the
prefix's checksums; the table shows where TTFT goes. Recompute is the same
prompt with no store at all. Every timed run's first token is checked against
recompute's (exact in float32; bf16 may differ in rare near-ties, so it is
reported, not asserted). It measures in process, not over HTTP: the router and
worker hops add the same milliseconds to both sides.

The anchor is the resident prefix: its K/V already sits in the engine's own pages
(a local prefix-cache hit, vLLM's automatic prefix caching) and only the rest is
computed, timed in the same run. No store can do better, so each store-fed TTFT
is also reported as a ratio to it. On a GPU the store-fed TTFT is measured per
tier the prefix is served from: the host tier (a server without an HBM tier:
DMA out of the shared host pool) and the HBM tier (a server with one, the prefix
made hot and promoted before timing: device-to-device copies out of its pool).
The timed runs go round robin (every tier, then the anchor, per repeat), so the
drift of a shared host falls on both sides of each ratio. The anchor's prefix is
computed once per prompt (untimed) and kept in pages of its own, so each store is
called every ~10-15 ms, as a prefill worker under load calls it, not once per
full prefill of the prefix; the servers' readers poll BUSY_POLL_US between calls.
A store called less often than that pays its reader's wakeup and cold caches:
docs/hbm.md has both.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from engines.adapter import StoreAdapter, loadable_blocks  # noqa: E402
from engines.attention import SeqChunk  # noqa: E402
from engines.checkpoint import load_checkpoint  # noqa: E402
from engines.cuda_graphs import DEFAULT_MAX_TOKENS  # noqa: E402
from engines.config import dtype_from_name, dtype_name  # noqa: E402
from engines.fingerprint import checkpoint_fingerprint  # noqa: E402
from engines.generate import sample_next  # noqa: E402
from engines.paged_cache import PagedKVCache  # noqa: E402
from engines.presets import PRESETS, ensure_random_checkpoint  # noqa: E402
from engines.tokenizer import NUM_BYTES, ByteTokenizer  # noqa: E402
from bench.h2d_fetch import TARGET as FETCH_TARGET, gbps, pinned_anchor_ms  # noqa: E402
from kvwire.types import Tier  # noqa: E402
from tests.serverproc import ServerProc  # noqa: E402

HIT_RATIOS = (0.0, 0.5, 0.9, 1.0)
TIERS = ("host", "hbm")
PROMOTION_WAIT_S = 30.0
DEFAULT_CONTEXTS = (1024, 4096, 8192)
# A server reader's poll window: longer than the time between one store's calls here. A prefill worker calls its store once
# a request (~10 ms apart at 8k / 90%); the round robin puts the other tier's run and the anchor's between one store's
# calls, up to ~25 ms at 8k / 90%, and a reader woken from a blocked recv costs a Pin ~0.2-0.3 ms (docs/hbm.md).
BUSY_POLL_US = 50_000
QUICK_CONTEXTS = (1024, 4096)


@dataclass(frozen=True)
class Timing:
    """Where one cached run's TTFT went. On a GPU the prefix streams in layer by layer under the
    forward pass (adapter.StreamedPrefixLoad), so the DMA overlaps compute and is timed apart."""

    lookup_s: float  # the prompt's block keys
    prepare_s: float  # GPU: one Pin RPC that finds and pins the cached prefix; host: Lookup RPC + the whole fetch
    rpc_s: float  # of prepare_s, the control round trips as the client timed them (the rest is client-side Python)
    start_s: float  # GPU: enqueueing the per-layer DMAs; host: scattering the payload into pages
    compute_s: float  # the uncached tokens' forward and the first token (waits for each layer's DMA)
    finish_s: float  # checksums not done by the time the first token was
    dma_ms: float  # GPU time of the whole prefix DMA (overlapped with compute)
    total_s: float
    fetched_bytes: int
    token: int
    computed_tokens: int


@dataclass(frozen=True)
class Row:
    tier: str  # the tier the prefix was served from: host, or hbm
    context: int
    hit: float
    cached_tokens: int
    computed_tokens: int
    lookup_ms: float
    prepare_ms: float
    rpc_ms: float
    start_ms: float
    compute_ms: float
    finish_ms: float
    dma_ms: float
    fetch_gbps: float
    ttft_ms: float
    recompute_ms: float
    first_token_ok: bool

    @property
    def speedup(self) -> float:
        return self.recompute_ms / self.ttft_ms


@dataclass(frozen=True)
class Anchor:
    """One (context, hit) point against the resident prefix, measured in the same run."""

    context: int
    hit: float
    recompute_ms: float
    resident_ms: float
    store_ms: dict[str, float]  # tier -> store-fed TTFT
    resident_token_ok: bool

    def ratio(self, tier: str) -> float:
        return self.store_ms[tier] / self.resident_ms if tier in self.store_ms else float("nan")


@dataclass(frozen=True)
class FetchRow:
    """A context's host-tier fetch against pinned host-to-device bandwidth, both from this run."""

    context: int
    blocks: int
    nbytes: int
    in_pass_gbps: float  # the highest-hit host row's DMA, paced by the forward pass enqueueing it
    fetch_gbps: float  # the same prefix loaded with no forward pass: every layer enqueued at once
    anchor_gbps: float  # one cudaMemcpyAsync of nbytes from a pinned buffer
    host_copy: str

    @property
    def ratio(self) -> float:
        return self.fetch_gbps / self.anchor_gbps if self.anchor_gbps else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace, stores: dict[str, str], checkpoint: Path) -> None:
        self.device = torch.device(args.device)
        self.dtype = dtype_from_name(args.dtype)
        self.model = load_checkpoint(checkpoint, device=self.device, dtype=self.dtype)
        if self.device.type == "cuda":
            self.model.use_cuda_graphs(args.cuda_graph_tokens)
        config = self.model.config
        pages = 2 * (-(-max(args.contexts) // args.block_tokens) + 2)  # a run's, and the anchor's kept prefix (resident)
        self.cache = PagedKVCache.for_model(config, pages, args.block_tokens, dtype=self.dtype, device=self.device)
        fingerprint = checkpoint_fingerprint(checkpoint, config, self.dtype, args.block_tokens,
                                             revision=f"bench-{args.model_size}-{dtype_name(self.dtype)}")
        self._resident_key: tuple | None = None  # the prompt prefix the anchor's own pages hold (resident)
        # One server per tier the prefix is served from; the same fingerprint, cache and model.
        self.adapters = {tier: StoreAdapter.for_cache(address, fingerprint, self.cache, transport=args.transport)
                         for tier, address in stores.items()}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def forward_first_token(self, prompt: list[int], start: int, table: list[int]) -> int:
        logits = self.model(self.cache, [SeqChunk(prompt[start:], start, table)], last_only=True)
        return int(sample_next(logits)[0])  # .item() waits for the GPU: the token exists

    def recompute(self, prompt: list[int]) -> tuple[float, int]:
        table = self.cache.allocate("run", len(prompt))
        try:
            t0 = time.perf_counter()
            token = self.forward_first_token(prompt, 0, table)
            return time.perf_counter() - t0, token
        finally:
            self.cache.free("run")

    @torch.inference_mode()
    def resident(self, prompt: list[int], num_blocks: int) -> tuple[float, int]:
        """The anchor: the prefix a store load would bring (the same blocks) already in the pages (computed
        untimed, once per prompt: kept in pages of its own between repeats), then timed: the rest of the prompt
        and the first token, as a local prefix-cache hit costs. The rest overwrites its own pages each time."""
        start = loadable_blocks(num_blocks, len(prompt), self.cache.block_tokens) * self.cache.block_tokens
        key = (tuple(prompt[:start]), len(prompt))
        if self._resident_key != key:
            self.cache.free("resident")
            self._resident_key = None
            table = self.cache.allocate("resident", len(prompt))
            if start:
                self.model(self.cache, [SeqChunk(prompt[:start], 0, table)], last_only=True)
                self.sync()
            self._resident_key = key
        table = self.cache.block_table("resident")
        t0 = time.perf_counter()
        token = self.forward_first_token(prompt, start, table)
        return time.perf_counter() - t0, token

    @torch.inference_mode()
    def publish_prefix(self, prompt: list[int], num_blocks: int) -> None:
        """Untimed: compute the prompt's first num_blocks blocks and put them in every tier's store."""
        if num_blocks == 0:
            return
        prefix = prompt[: num_blocks * self.cache.block_tokens]
        table = self.cache.allocate("warm", len(prefix))
        try:
            self.model(self.cache, [SeqChunk(prefix, 0, table)], last_only=True)
            payload = self.cache.gather_blocks(table[:num_blocks]).cpu()
            for adapter in self.adapters.values():
                with adapter.session() as client:
                    adapter.upload(client, adapter.block_keys(prefix), payload)
        finally:
            self.cache.free("warm")

    def promote(self, prompt: list[int], num_blocks: int) -> None:
        """Untimed, on the HBM tier's server: read the prefix twice (the promotion policy's threshold) and wait
        until every block a load would take sits in HBM."""
        adapter = self.adapters["hbm"]
        num_load = loadable_blocks(num_blocks, len(prompt), self.cache.block_tokens)
        if num_load == 0:
            return
        with adapter.session() as client:
            keys = adapter.block_keys(prompt)[:num_load]
            deadline = time.monotonic() + PROMOTION_WAIT_S
            while True:
                with client.pin(keys) as pinned:
                    if pinned.tiers.count(Tier.HBM) == num_load:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{pinned.tiers.count(Tier.HBM)} of {num_load} blocks reached the HBM tier in {PROMOTION_WAIT_S} s")
                time.sleep(0.05)

    @torch.inference_mode()
    def reuse(self, prompt: list[int], tier: str = "host") -> Timing:
        """Timed like a prefill worker: lookup, load the prefix, compute the rest, first token."""
        adapter = self.adapters[tier]
        t0 = time.perf_counter()
        table = self.cache.allocate("run", len(prompt))
        try:
            with adapter.session() as client:
                keys = adapter.block_keys(prompt)
                t_lookup = time.perf_counter()
                with adapter.prepare_prefix_load(client, keys, len(prompt)) as load:
                    t_prepared = time.perf_counter()
                    start = load.num_blocks * self.cache.block_tokens
                    load.start(self.cache, table)
                    t_started = time.perf_counter()
                    logits = self.model(self.cache, [SeqChunk(prompt[start:], start, table)], last_only=True,
                                        before_layer=load.wait_for_layer)
                    token = int(sample_next(logits)[0])  # .item() waits for the GPU: the token exists
                    t_computed = time.perf_counter()
                    load.finish()  # the token counts only once every block passed its check
                    t_end = time.perf_counter()
            fetched_bytes = load.num_blocks * self.cache.block_bytes
            rpc_s = load.stats.control_s if load.stats is not None else 0.0
            return Timing(t_lookup - t0, t_prepared - t_lookup, rpc_s, t_started - t_prepared, t_computed - t_started,
                          t_end - t_computed, load.dma_ms(), t_end - t0, fetched_bytes, token, len(prompt) - start)
        finally:
            self.cache.free("run")

    @torch.inference_mode()
    def fetch_only(self, prompt: list[int], repeats: int) -> tuple[int, float, str]:
        """The host tier's load of the prompt's loadable prefix with no forward pass: (blocks, median dma ms,
        how the host blocks moved). Its GB/s is the fetch's own, not the pace of the pass enqueueing it."""
        adapter = self.adapters["host"]
        times, blocks, how = [], 0, ""
        for r in range(repeats + 1):
            table = self.cache.allocate("fetch", len(prompt))
            try:
                with adapter.session() as client:
                    with adapter.prepare_prefix_load(client, adapter.block_keys(prompt), len(prompt)) as load:
                        load.start(self.cache, table)
                        load.finish()
                blocks, how = load.num_blocks, load.stats.extra.get("host_copy", "")
                if r:  # the first is a warm-up
                    times.append(load.dma_ms())
            finally:
                self.cache.free("fetch")
        return blocks, statistics.median(times), how

    def close(self) -> None:
        for adapter in self.adapters.values():
            adapter.close()


def make_prompt(context: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(0, NUM_BYTES, (context - 1,), generator=generator).tolist()
    return [ByteTokenizer().bos_id, *body]


def run(bench: Bench, contexts: list[int], repeats: int, hit_ratios: tuple[float, ...] = HIT_RATIOS
        ) -> tuple[list[Row], list[Anchor], list[FetchRow]]:
    rows, anchors, fetches = [], [], []
    bt = bench.cache.block_tokens
    tiers = list(bench.adapters)
    progress = tqdm(total=len(contexts) * (1 + len(hit_ratios) * (1 + len(tiers))) * repeats, desc="prefix reuse", unit="run")
    warm = make_prompt(min(contexts), seed=0)
    bench.recompute(warm)  # first-call allocations, kernel selection and lazy init stay out of the numbers
    for tier in tiers:
        bench.reuse(warm, tier)
    for context in contexts:
        recompute_runs, reference = [], None
        bench.recompute(make_prompt(context, seed=context))  # untimed: the allocator's first use of this size
        for _ in range(repeats):
            seconds, reference = bench.recompute(make_prompt(context, seed=context))
            recompute_runs.append(seconds)
            progress.update()
        recompute_ms = 1000 * statistics.median(recompute_runs)
        for hit in hit_ratios:
            prompt = make_prompt(context, seed=context)
            # Each (context, hit) gets its own salt block so no ratio reuses another's blocks.
            prompt[1] = int(hit * 100) % NUM_BYTES
            _, reference = bench.recompute(prompt)
            num_blocks = int(hit * context) // bt
            bench.publish_prefix(prompt, num_blocks)
            for tier in tiers:
                if tier == "hbm":
                    bench.promote(prompt, num_blocks)
                bench.reuse(prompt, tier)  # untimed: captures this chunk size's CUDA graphs, first use of its buffers
            bench.resident(prompt, num_blocks)  # untimed, as every path gets one
            # Round robin: each repeat times every tier and then the anchor, so a host's drift (these machines are
            # shared) moves numerator and denominator of a ratio alike instead of landing on one side of it.
            timings = {tier: [] for tier in tiers}
            resident_runs, resident_tokens = [], []
            for _ in range(repeats):
                for tier in tiers:
                    timings[tier].append(bench.reuse(prompt, tier))
                    progress.update()
                seconds, token = bench.resident(prompt, num_blocks)
                resident_runs.append(seconds)
                resident_tokens.append(token)
                progress.update()
            store_ms = {}
            for tier in tiers:
                ok = all(t.token == reference for t in timings[tier])
                rows.append(summarize(tier, context, hit, timings[tier], recompute_ms, ok))
                store_ms[tier] = rows[-1].ttft_ms
            resident_ok = all(token == reference for token in resident_tokens)
            anchors.append(Anchor(context, hit, recompute_ms, 1000 * statistics.median(resident_runs), store_ms, resident_ok))
        if bench.device.type == "cuda" and "host" in tiers and hit_ratios and max(hit_ratios) > 0:
            fetches.append(measure_fetch(bench, context, max(hit_ratios), rows, repeats))
    progress.close()
    return rows, anchors, fetches


def measure_fetch(bench: Bench, context: int, hit: float, rows: list[Row], repeats: int) -> FetchRow:
    """The host tier's fetch of the highest-hit prompt (published above) and, right after, the pinned anchor."""
    prompt = make_prompt(context, seed=context)
    prompt[1] = int(hit * 100) % NUM_BYTES
    blocks, fetch_ms, how = bench.fetch_only(prompt, max(repeats, 5))
    nbytes = blocks * bench.cache.block_bytes
    anchor_ms = pinned_anchor_ms(nbytes, max(repeats, 5), bench.device)
    in_pass = next((r.fetch_gbps for r in rows if r.tier == "host" and r.context == context and r.hit == hit), 0.0)
    return FetchRow(context, blocks, nbytes, in_pass, gbps(nbytes, fetch_ms), gbps(nbytes, anchor_ms), how)


def format_fetch_table(fetches: list[FetchRow]) -> str:
    """One line per context: the host-tier fetch against the same run's pinned host-to-device copy."""
    header = f"{'context':>7} {'blocks':>6} {'MiB':>5} {'path':>12} {'in-pass GB/s':>12} {'fetch GB/s':>10} " \
             f"{'pinned H2D GB/s':>15} {'ratio':>5}  target >= {FETCH_TARGET:.2f}"
    lines = [header, "-" * len(header)]
    for f in fetches:
        lines.append(f"{f.context:>7} {f.blocks:>6} {f.nbytes / (1 << 20):>5.0f} {f.host_copy:>12} {f.in_pass_gbps:>12.1f} "
                     f"{f.fetch_gbps:>10.1f} {f.anchor_gbps:>15.1f} {f.ratio:>5.2f}  {'PASS' if f.ratio >= FETCH_TARGET else 'MISS'}")
    lines.append("host-tier fetch of the highest-hit prefix out of the shared host pool into the pages (GPU time, first move to "
                 "last layer landed; medians): in-pass as the forward pass enqueues it layer by layer, fetch with every layer "
                 "enqueued at once; pinned H2D: one cudaMemcpyAsync of the same bytes from a cudaHostAlloc buffer, this run; "
                 "ratio = fetch / pinned H2D")
    return "\n".join(lines)


def summarize(tier: str, context: int, hit: float, timings: list[Timing], recompute_ms: float, ok: bool) -> Row:
    """Medians, phase by phase: the phases need not add up to the median TTFT exactly."""
    def ms(field: str) -> float:
        return 1000 * statistics.median(getattr(t, field) for t in timings)

    computed = timings[0].computed_tokens
    dma_ms = statistics.median(t.dma_ms for t in timings)
    moved_ms = dma_ms or ms("prepare_s") + ms("start_s")  # host: the fetch and the scatter
    gbps = timings[0].fetched_bytes / moved_ms / 1e6 if timings[0].fetched_bytes and moved_ms else 0.0
    return Row(tier, context, hit, context - computed, computed, ms("lookup_s"), ms("prepare_s"), ms("rpc_s"),
               ms("start_s"), ms("compute_s"), ms("finish_s"), dma_ms, gbps, ms("total_s"), recompute_ms, ok)


def format_table(rows: list[Row]) -> str:
    header = f"{'tier':>4} {'context':>7} {'hit':>5} {'cached':>7} {'computed':>8} {'lookup':>7} {'prepare':>7} {'rpc':>5} {'start':>6} " \
             f"{'compute':>7} {'finish':>6} {'dma':>6} {'GB/s':>6} {'TTFT ms':>8} " \
             f"{'recompute':>9} {'speedup':>7} {'token':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.tier:>4} {r.context:>7} {r.hit:>5.0%} {r.cached_tokens:>7} {r.computed_tokens:>8} {r.lookup_ms:>7.2f} "
                     f"{r.prepare_ms:>7.2f} {r.rpc_ms:>5.2f} {r.start_ms:>6.2f} {r.compute_ms:>7.2f} {r.finish_ms:>6.2f} "
                     f"{r.dma_ms:>6.2f} {r.fetch_gbps:>6.1f} {r.ttft_ms:>8.2f} {r.recompute_ms:>9.2f} "
                     f"{r.speedup:>6.1f}x {'ok' if r.first_token_ok else 'DIFF':>5}")
    lines.append("ms, medians per phase. lookup: block keys; prepare: GPU one prefix Pin RPC, host Lookup + the whole fetch; rpc: of prepare, the control round trips as the client timed them; start: GPU planning the DMAs, enqueueing layer 0's, "
                 "host the scatter; compute overlaps the GPU's dma (layer i waits only for its own "
                 "layer); dma: first copy to last layer landed (the copies after layer 0's are enqueued once the forward pass "
                 "has begun); finish: checksums still running when the first token was ready")
    return "\n".join(lines)


def format_anchor_table(anchors: list[Anchor], tiers: list[str]) -> str:
    """Store-fed TTFT per tier against the resident prefix, all from this run: the ratios are the targets."""
    header = f"{'context':>7} {'hit':>5} {'recompute':>9} " + " ".join(f"{t + ' TTFT':>9}" for t in tiers) + \
             f" {'resident':>8} " + " ".join(f"{t + '/res':>8}" for t in tiers) + f" {'token':>5}"
    lines = [header, "-" * len(header)]
    for a in anchors:
        lines.append(f"{a.context:>7} {a.hit:>5.0%} {a.recompute_ms:>9.2f} " + " ".join(f"{a.store_ms[t]:>9.2f}" for t in tiers) +
                     f" {a.resident_ms:>8.2f} " + " ".join(f"{a.ratio(t):>8.2f}" for t in tiers) +
                     f" {'ok' if a.resident_token_ok else 'DIFF':>5}")
    lines.append("ms, medians. TTFT per tier the prefix was served from (host: DMA out of the shared host pool; hbm: device to "
                 "device out of the server's HBM pool, the prefix promoted first); resident: the same prefix already in the "
                 "engine's pages, only the rest computed (a local prefix-cache hit: the anchor); x/res: store-fed TTFT / resident")
    return "\n".join(lines)


def plot(rows: list[Row], anchors: list[Anchor], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft_ax, tokens_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"host": "o-", "hbm": "s-."}
    for i, context in enumerate(sorted({r.context for r in rows})):
        color = f"C{i}"
        for tier, style in styles.items():
            mine = [r for r in rows if r.context == context and r.tier == tier]
            if mine:
                ttft_ax.plot([100 * r.hit for r in mine], [r.ttft_ms for r in mine], style, color=color,
                             label=f"{context} tokens, {tier}")
        mine = [r for r in rows if r.context == context and r.tier == rows[0].tier]
        ttft_ax.axhline(mine[0].recompute_ms, color=color, linestyle="--", linewidth=1)
        resident = [a for a in anchors if a.context == context]
        ttft_ax.plot([100 * a.hit for a in resident], [a.resident_ms for a in resident], ":", color=color, linewidth=1.5)
        tokens_ax.plot([100 * r.hit for r in mine], [r.computed_tokens for r in mine], "o-", color=color, label=f"{context} tokens")
    ttft_ax.set(xlabel="prefix hit ratio (%)", ylabel="TTFT (ms, log)", yscale="log",
                title="store-fed TTFT (host o-, hbm s-.), resident (:), recompute (--)")
    tokens_ax.set(xlabel="prefix hit ratio (%)", ylabel="prompt tokens computed", title="Tokens computed")
    ttft_ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def store_flags(args: argparse.Namespace, tier: str = "host") -> dict:
    """A host tier (and for the hbm server an HBM tier) large enough for every published block, so nothing
    is demoted or displaced mid-run."""
    config = PRESETS[args.model_size]
    token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * \
        torch.empty((), dtype=dtype_from_name(args.dtype)).element_size()
    needed_mib = int(sum(args.contexts) * sum(args.hit_ratios) * token_bytes * 1.25) // (1 << 20) + 256
    # The server's reader polls between an engine's calls (docs/hbm.md, "Latency"): an engine on a GPU host calls every
    # few ms, and a reader woken from a blocked recv cost the prefix Pin ~0.3 ms of its ~0.5 on an H200 host.
    flags = {"host_memory": f"{needed_mib}MiB", "ssd_capacity": f"{2 * needed_mib}MiB", "lease_ttl_s": 30,
             "local_control_busy_poll_us": BUSY_POLL_US}
    if tier == "hbm":
        flags["hbm_memory"] = f"{max(needed_mib, 32)}MiB"
    return flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--model-size", default=None, choices=sorted(PRESETS), help="default: 1b on cuda, small on cpu")
    parser.add_argument("--contexts", default=None, help="comma-separated token counts (default 1024,4096,8192)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point, median reported (default 3)")
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--cuda-graph-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="on CUDA, passes of up to this many tokens replay piecewise CUDA graphs (0: eager)")
    parser.add_argument("--transport", default="auto", help="kvclient transport (auto | grpc | shm | ucx)")
    parser.add_argument("--tiers", default=None, help="tiers to serve the prefix from: host,hbm (default: both on cuda, host on cpu)")
    parser.add_argument("--hit-ratios", default=None, help="comma-separated prefix-hit ratios (default 0,0.5,0.9,1)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="contexts 1k,4k, one run each: a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="where the PNG and table go")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="where random checkpoints are cached (default: --out)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.model_size = args.model_size or ("1b" if cuda else "small")
    default_contexts = QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS
    args.contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else list(default_contexts)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.hit_ratios = tuple(float(h) for h in args.hit_ratios.split(",")) if args.hit_ratios else HIT_RATIOS
    args.tiers = [t for t in (args.tiers or ("host,hbm" if cuda else "host")).split(",") if t]
    if not set(args.tiers) <= set(TIERS) or not args.tiers:
        parser.error(f"--tiers takes some of {', '.join(TIERS)}")
    if "hbm" in args.tiers and not cuda:
        parser.error("--tiers hbm needs --device cuda: the HBM tier is device memory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = ensure_random_checkpoint((args.checkpoint_dir or args.out / "checkpoints") / f"{args.model_size}-{args.dtype}",
                                          args.model_size, dtype=dtype_from_name(args.dtype))
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-") as tmp:
        servers = {tier: ServerProc(Path(tmp) / f"data-{tier}", flags=store_flags(args, tier)) for tier in args.tiers}
        try:
            for server in servers.values():
                server.start()
            bench = Bench(args, {tier: server.address for tier, server in servers.items()}, checkpoint)
            with bench.adapters[args.tiers[0]].session() as client:
                transport = client.transport.name
            rows, anchors, fetches = run(bench, args.contexts, args.repeats, args.hit_ratios)
            bench.close()
        finally:
            for server in servers.values():
                server.stop()
    title = (f"prefix reuse: {args.model_size} model, {args.dtype}, {args.device}, "
             f"block {args.block_tokens} tokens, transport {transport}, median of {args.repeats}")
    table = format_table(rows) + "\n\n" + format_anchor_table(anchors, args.tiers)
    if fetches:
        table += "\n\n" + format_fetch_table(fetches)
    print(f"\n{title}\n{table}")
    stem = f"prefix_reuse-{args.device}-{args.model_size}"
    (args.out / f"{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.txt").write_text(f"{title}\n{table}\n")
    plot(rows, anchors, args.out / f"{stem}.png", title)
    print(f"saved {args.out / (stem + '.png')} and {stem}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
