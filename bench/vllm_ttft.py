"""vLLM's time-to-first-token with and without kvstore, by prefix-hit ratio, on CPU.

    python bench/vllm_ttft.py                   # tiny Llama (hidden 256, 4 layers), 2k-token prompts
    python bench/vllm_ttft.py --quick           # 1k-token prompts, 3 per ratio
    python bench/vllm_ttft.py --hidden 1024 --layers 8

Needs the vLLM environment (`make vllm-env`). Three vLLM processes, each a fresh engine as a
new replica would be: a writer computes and stores, through the connector, one distinct prefix
per timed prompt (prefix = hit ratio x prompt length, rounded down to vLLM's 128-token
blocks); a reader with the connector then answers each timed prompt (its prefix + a tail it
has never seen) one at a time, max_tokens=1; the anchor is a vLLM without the connector
answering the same prompts. Distinct prefixes keep vLLM's own prefix cache out of both
sides, so the difference is what kvstore adds: loading the stored blocks instead of
computing them, and at 0% the connector's cost (lookups, and saving every new block). TTFT is
the wall time of one generate() call for one prompt, after a warm-up prompt; the table
prints the best and the median of each ratio's prompts (on a shared machine the best is the
steadier number), the speed-up of the best against the anchor's best, and whether the first
tokens matched.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.checkpoint import random_state_dict, save_checkpoint  # noqa: E402
from tests.connectors.vllmproc import BLOCK_TOKENS, TINY, WEIGHT_SCALE, requests, run_vllm, stats, tokens, vllm_missing  # noqa: E402
from tests.serverproc import ServerProc  # noqa: E402

TAIL_SEED = 10_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--prompts", type=int, default=8, help="timed prompts per ratio")
    parser.add_argument("--hidden", type=int, default=TINY.hidden_size)
    parser.add_argument("--layers", type=int, default=TINY.num_hidden_layers)
    parser.add_argument("--quick", action="store_true", help="1k-token prompts, 3 per ratio")
    return parser.parse_args()


def prompts_for(args: argparse.Namespace) -> tuple[dict[float, list[list[int]]], list[list[int]]]:
    """Per ratio, the timed prompts; and the writer's prompts storing their prefixes (each with its own tail)."""
    timed: dict[float, list[list[int]]] = {}
    writes: list[list[int]] = []
    for r, ratio in enumerate(args.ratios):
        prefix_tokens = int(ratio * args.tokens) // BLOCK_TOKENS * BLOCK_TOKENS
        timed[ratio] = []
        for i in range(args.prompts):
            seed = 1000 * (r + 1) + i
            prefix = tokens(prefix_tokens, seed)
            timed[ratio].append(prefix + tokens(args.tokens - prefix_tokens, TAIL_SEED + seed))
            if prefix_tokens:
                writes.append(prefix + tokens(1, 2 * TAIL_SEED + seed))
    return timed, writes


def main() -> None:
    args = parse_args()
    if args.quick:
        args.tokens, args.prompts = 1024, 3
    args.ratios = sorted(set(args.ratios))
    missing = vllm_missing()
    if missing:
        raise SystemExit(missing)
    timed, writes = prompts_for(args)
    warmup = [{"prompt": tokens(args.tokens, 7), "max_tokens": 1}]
    batches = [warmup] + [[{"prompt": p, "max_tokens": 1}] for ratio in args.ratios for p in timed[ratio]]
    common = dict(max_model_len=max(2048, 2 * args.tokens))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = replace(TINY, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128))
        state = random_state_dict(config)
        checkpoint = str(save_checkpoint(work / "model", config, {k: v if k.endswith("norm.weight") else v * WEIGHT_SCALE
                                                                  for k, v in state.items()}))
        server = ServerProc(work / "store", flags={"host_memory": "2GiB", "ssd_capacity": "4GiB"}).start()
        try:
            if writes:
                run_vllm(work, "writer", checkpoint=checkpoint, store=server.address, batches=[[{"prompt": p, "max_tokens": 1} for p in writes]], **common)
            reader = run_vllm(work, "reader", checkpoint=checkpoint, store=server.address, batches=batches, **common)
            anchor = run_vllm(work, "anchor", checkpoint=checkpoint, store=None, batches=batches, **common)
        finally:
            server.stop()
    report(args, config, reader, anchor)


def report(args: argparse.Namespace, config, reader: dict, anchor: dict) -> None:
    with_store, without = requests(reader)[1:], requests(anchor)[1:]  # the warm-up prompt is not counted
    print(f"vLLM {args.tokens}-token prompts, Llama hidden {config.hidden_size} x {config.num_hidden_layers} layers, float32, CPU; "
          f"{args.prompts} prompts per ratio, TTFT best / median")
    print(f"{'hit':>5} {'cached tok':>10} {'kvstore ms':>15} {'no store ms':>15} {'speed-up':>9} {'same token':>11}")
    for r, ratio in enumerate(args.ratios):
        rows = slice(r * args.prompts, (r + 1) * args.prompts)
        ours, theirs = with_store[rows], without[rows]
        ours_ms = [x["wall_s"] * 1e3 for x in ours]
        theirs_ms = [x["wall_s"] * 1e3 for x in theirs]
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(ours, theirs))
        cached = statistics.median(x["num_cached_tokens"] for x in ours)
        print(f"{ratio:>5.0%} {cached:>10.0f} {min(ours_ms):>7.1f} / {statistics.median(ours_ms):>5.1f} "
              f"{min(theirs_ms):>7.1f} / {statistics.median(theirs_ms):>5.1f} {min(theirs_ms) / min(ours_ms):>8.2f}x {same:>5}/{len(ours)}")
    print(f"reader's connector: {stats(reader)}")


if __name__ == "__main__":
    main()
