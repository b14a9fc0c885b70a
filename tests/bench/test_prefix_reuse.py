"""bench/prefix_reuse.py end to end on the CPU: a real server, the small model, every timed run's first token checked.

The anchor keeps its prefix in pages of its own between repeats (Bench.resident): a stale page there would change its
token, which the run compares with a full recompute's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import prefix_reuse as pr  # noqa: E402
from engines.config import dtype_from_name  # noqa: E402
from engines.presets import ensure_random_checkpoint  # noqa: E402
from tests.serverproc import ServerProc  # noqa: E402

pytestmark = pytest.mark.slow


def test_every_timed_run_gives_the_recomputed_token_and_the_anchor_keeps_its_prefix(tmp_path):
    args = pr.parse_args(["--contexts", "128", "--hit-ratios", "0.5,1", "--repeats", "2", "--out", str(tmp_path)])
    checkpoint = ensure_random_checkpoint(tmp_path / "ckpt", args.model_size, dtype=dtype_from_name(args.dtype))
    server = ServerProc(tmp_path / "data", flags=pr.store_flags(args, "host")).start()
    try:
        bench = pr.Bench(args, {"host": server.address}, checkpoint)
        try:
            rows, anchors, _ = pr.run(bench, args.contexts, args.repeats, args.hit_ratios)
            prompt = pr.make_prompt(128, seed=3)
            _, reference = bench.recompute(prompt)
            kept = [bench.resident(prompt, 4)[1] for _ in range(3)]  # the second and third reuse the first's prefix pages
            other = pr.make_prompt(128, seed=4)
            _, other_reference = bench.recompute(other)
            switched = bench.resident(other, 4)[1]  # another prompt: its own prefix, computed anew
        finally:
            bench.close()
    finally:
        server.stop()
    assert [(r.context, r.hit) for r in rows] == [(128, 0.5), (128, 1.0)] and all(r.first_token_ok for r in rows)
    assert len(anchors) == 2 and all(a.resident_token_ok for a in anchors)
    assert kept == [reference] * 3 and switched == other_reference
