"""How much time-to-first-token does a stored prefix save? TTFT and tokens computed vs prefix-hit ratio.

    python bench/prefix_reuse.py                                  # CPU, small model, 1k/4k/8k
    python bench/prefix_reuse.py --quick                          # CPU smoke run
    python bench/prefix_reuse.py --device cuda --model-size 1b    # the GPU target: 90% hit at 8k >= 5x

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

from engines.adapter import StoreAdapter  # noqa: E402
from engines.attention import SeqChunk  # noqa: E402
from engines.checkpoint import load_checkpoint  # noqa: E402
from engines.cuda_graphs import DEFAULT_MAX_TOKENS  # noqa: E402
from engines.config import dtype_from_name, dtype_name  # noqa: E402
from engines.fingerprint import checkpoint_fingerprint  # noqa: E402
from engines.generate import sample_next  # noqa: E402
from engines.paged_cache import PagedKVCache  # noqa: E402
from engines.presets import PRESETS, ensure_random_checkpoint  # noqa: E402
from engines.tokenizer import NUM_BYTES, ByteTokenizer  # noqa: E402
from tests.serverproc import ServerProc  # noqa: E402

HIT_RATIOS = (0.0, 0.5, 0.9, 1.0)
DEFAULT_CONTEXTS = (1024, 4096, 8192)
QUICK_CONTEXTS = (1024, 4096)


@dataclass(frozen=True)
class Timing:
    """Where one cached run's TTFT went. On a GPU the prefix streams in layer by layer under the
    forward pass (adapter.StreamedPrefixLoad), so the DMA overlaps compute and is timed apart."""

    lookup_s: float  # the prompt's block keys
    prepare_s: float  # GPU: one Pin RPC that finds and pins the cached prefix; host: Lookup RPC + the whole fetch
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
    context: int
    hit: float
    cached_tokens: int
    computed_tokens: int
    lookup_ms: float
    prepare_ms: float
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


class Bench:
    def __init__(self, args: argparse.Namespace, store_address: str, checkpoint: Path) -> None:
        self.device = torch.device(args.device)
        self.dtype = dtype_from_name(args.dtype)
        self.model = load_checkpoint(checkpoint, device=self.device, dtype=self.dtype)
        if self.device.type == "cuda":
            self.model.use_cuda_graphs(args.cuda_graph_tokens)
        config = self.model.config
        pages = -(-max(args.contexts) // args.block_tokens) + 2
        self.cache = PagedKVCache.for_model(config, pages, args.block_tokens, dtype=self.dtype, device=self.device)
        fingerprint = checkpoint_fingerprint(checkpoint, config, self.dtype, args.block_tokens,
                                             revision=f"bench-{args.model_size}-{dtype_name(self.dtype)}")
        self.adapter = StoreAdapter.for_cache(store_address, fingerprint, self.cache, transport=args.transport)

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
    def publish_prefix(self, prompt: list[int], num_blocks: int) -> None:
        """Untimed: compute the prompt's first num_blocks blocks and put them in the store."""
        if num_blocks == 0:
            return
        prefix = prompt[: num_blocks * self.cache.block_tokens]
        table = self.cache.allocate("warm", len(prefix))
        try:
            self.model(self.cache, [SeqChunk(prefix, 0, table)], last_only=True)
            payload = self.cache.gather_blocks(table[:num_blocks]).cpu()
            with self.adapter.session() as client:
                self.adapter.upload(client, self.adapter.block_keys(prefix), payload)
        finally:
            self.cache.free("warm")

    @torch.inference_mode()
    def reuse(self, prompt: list[int]) -> Timing:
        """Timed like a prefill worker: lookup, load the prefix, compute the rest, first token."""
        t0 = time.perf_counter()
        table = self.cache.allocate("run", len(prompt))
        try:
            with self.adapter.session() as client:
                keys = self.adapter.block_keys(prompt)
                t_lookup = time.perf_counter()
                with self.adapter.prepare_prefix_load(client, keys, len(prompt)) as load:
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
            return Timing(t_lookup - t0, t_prepared - t_lookup, t_started - t_prepared, t_computed - t_started,
                          t_end - t_computed, load.dma_ms(), t_end - t0, fetched_bytes, token, len(prompt) - start)
        finally:
            self.cache.free("run")

    def close(self) -> None:
        self.adapter.close()


def make_prompt(context: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(0, NUM_BYTES, (context - 1,), generator=generator).tolist()
    return [ByteTokenizer().bos_id, *body]


def run(bench: Bench, contexts: list[int], repeats: int) -> list[Row]:
    rows = []
    bt = bench.cache.block_tokens
    progress = tqdm(total=len(contexts) * (1 + len(HIT_RATIOS)) * repeats, desc="prefix reuse", unit="run")
    warm = make_prompt(min(contexts), seed=0)
    bench.recompute(warm)  # first-call allocations, kernel selection and lazy init stay out of the numbers
    bench.reuse(warm)
    for context in contexts:
        recompute_runs, reference = [], None
        bench.recompute(make_prompt(context, seed=context))  # untimed: the allocator's first use of this size
        for _ in range(repeats):
            seconds, reference = bench.recompute(make_prompt(context, seed=context))
            recompute_runs.append(seconds)
            progress.update()
        recompute_ms = 1000 * statistics.median(recompute_runs)
        for hit in HIT_RATIOS:
            prompt = make_prompt(context, seed=context)
            # Each (context, hit) gets its own salt block so no ratio reuses another's blocks.
            prompt[1] = int(hit * 100) % NUM_BYTES
            _, reference = bench.recompute(prompt)
            num_blocks = int(hit * context) // bt
            bench.publish_prefix(prompt, num_blocks)
            bench.reuse(prompt)  # untimed: captures this chunk size's CUDA graphs, first use of its buffers
            timings, ok = [], True
            for _ in range(repeats):
                timing = bench.reuse(prompt)
                timings.append(timing)
                ok = ok and timing.token == reference
                progress.update()
            rows.append(summarize(context, hit, timings, recompute_ms, ok))
    progress.close()
    return rows


def summarize(context: int, hit: float, timings: list[Timing], recompute_ms: float, ok: bool) -> Row:
    """Medians, phase by phase: the phases need not add up to the median TTFT exactly."""
    def ms(field: str) -> float:
        return 1000 * statistics.median(getattr(t, field) for t in timings)

    computed = timings[0].computed_tokens
    dma_ms = statistics.median(t.dma_ms for t in timings)
    moved_ms = dma_ms or ms("prepare_s") + ms("start_s")  # host: the fetch and the scatter
    gbps = timings[0].fetched_bytes / moved_ms / 1e6 if timings[0].fetched_bytes and moved_ms else 0.0
    return Row(context, hit, context - computed, computed, ms("lookup_s"), ms("prepare_s"), ms("start_s"),
               ms("compute_s"), ms("finish_s"), dma_ms, gbps, ms("total_s"), recompute_ms, ok)


def format_table(rows: list[Row]) -> str:
    header = f"{'context':>7} {'hit':>5} {'cached':>7} {'computed':>8} {'lookup':>7} {'prepare':>7} {'start':>6} " \
             f"{'compute':>7} {'finish':>6} {'dma':>6} {'GB/s':>6} {'TTFT ms':>8} " \
             f"{'recompute':>9} {'speedup':>7} {'token':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.context:>7} {r.hit:>5.0%} {r.cached_tokens:>7} {r.computed_tokens:>8} {r.lookup_ms:>7.2f} "
                     f"{r.prepare_ms:>7.2f} {r.start_ms:>6.2f} {r.compute_ms:>7.2f} {r.finish_ms:>6.2f} "
                     f"{r.dma_ms:>6.2f} {r.fetch_gbps:>6.1f} {r.ttft_ms:>8.2f} {r.recompute_ms:>9.2f} "
                     f"{r.speedup:>6.1f}x {'ok' if r.first_token_ok else 'DIFF':>5}")
    lines.append("ms, medians per phase. lookup: block keys; prepare: GPU one prefix Pin RPC, host Lookup + the whole fetch; start: GPU planning the DMAs, enqueueing layer 0's, "
                 "host the scatter; compute overlaps the GPU's dma (layer i waits only for its own "
                 "layer); dma: first copy to last layer landed (the copies after layer 0's are enqueued once the forward pass "
                 "has begun); finish: checksums still running when the first token was ready")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft_ax, tokens_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, context in enumerate(sorted({r.context for r in rows})):
        mine = [r for r in rows if r.context == context]
        color = f"C{i}"
        hits = [100 * r.hit for r in mine]
        ttft_ax.plot(hits, [r.ttft_ms for r in mine], "o-", color=color, label=f"{context} tokens")
        ttft_ax.axhline(mine[0].recompute_ms, color=color, linestyle="--", linewidth=1)
        tokens_ax.plot(hits, [r.computed_tokens for r in mine], "o-", color=color, label=f"{context} tokens")
    ttft_ax.set(xlabel="prefix hit ratio (%)", ylabel="TTFT (ms, log)", yscale="log",
                title="TTFT with reuse (solid) vs recompute (dashed)")
    tokens_ax.set(xlabel="prefix hit ratio (%)", ylabel="prompt tokens computed", title="Tokens computed")
    ttft_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def store_flags(args: argparse.Namespace) -> dict:
    """A host tier large enough for every published block, so nothing is demoted mid-run."""
    config = PRESETS[args.model_size]
    token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * \
        torch.empty((), dtype=dtype_from_name(args.dtype)).element_size()
    needed_mib = int(sum(args.contexts) * sum(HIT_RATIOS) * token_bytes * 1.25) // (1 << 20) + 256
    return {"host_memory": f"{needed_mib}MiB", "ssd_capacity": f"{2 * needed_mib}MiB", "lease_ttl_s": 30}


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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = ensure_random_checkpoint((args.checkpoint_dir or args.out / "checkpoints") / f"{args.model_size}-{args.dtype}",
                                          args.model_size, dtype=dtype_from_name(args.dtype))
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-") as tmp:
        server = ServerProc(Path(tmp) / "data", flags=store_flags(args)).start()
        try:
            bench = Bench(args, server.address, checkpoint)
            with bench.adapter.session() as client:
                transport = client.transport.name
            rows = run(bench, args.contexts, args.repeats)
            bench.close()
        finally:
            server.stop()
    title = (f"prefix reuse: {args.model_size} model, {args.dtype}, {args.device}, "
             f"block {args.block_tokens} tokens, transport {transport}, median of {args.repeats}")
    table = format_table(rows)
    print(f"\n{title}\n{table}")
    stem = f"prefix_reuse-{args.device}-{args.model_size}"
    (args.out / f"{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.txt").write_text(f"{title}\n{table}\n")
    plot(rows, args.out / f"{stem}.png", title)
    print(f"saved {args.out / (stem + '.png')} and {stem}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
