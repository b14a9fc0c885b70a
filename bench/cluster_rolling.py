"""Rolling restart under engine load: the remote-hit ratio over time while each kvstore node is restarted in turn.

Run by bench/cluster.py (its last rows and a PNG), or alone:

    python bench/cluster_rolling.py [--quick]

The deployment is `python -m engines.deploy --nodes 3`'s (engines/deploy_cluster.py: etcd, three nodes
on loopback with distinct host ids, a prefill and a decode worker per node on a tiny random checkpoint,
the router), driven in process so each store can be restarted: SIGTERM, started again with the same
name, host id and data dir, waited for until every node sees it a member. Three clients send
completions of fresh prompts through the router throughout (tests/engines/rolling.py, which also
defines the ratio: among completions whose decode ran on another node than their prefill, the share
of full-block prompt tokens the decode worker fetched instead of computing). The anchor is the same
ratio before the first restart, in the same run.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.deploy_cluster import ClusterDeployment  # noqa: E402
from engines.presets import ensure_random_checkpoint  # noqa: E402
from tests.engines.rolling import LoadLoop, annotate, cross_node, curve, hit_ratio, recovery_s  # noqa: E402
from tests.serverproc import free_port  # noqa: E402

WORKER_ARGS = ["--threads", "1", "--num-pages", "128", "--lease-ttl-s", "2", "--wait-timeout-s", "2"]
BIN_S = 1.0


@dataclass
class RollingResult:
    completions: int
    failed: int
    baseline: float | None           # remote-hit ratio before the first restart
    lowest: float | None             # lowest 1-s bin from the first restart on
    recovered_s: float | None        # after the last restart, until every later bin is >= 90% of baseline
    away_s: list[float]              # per node: SIGTERM until every node sees it back
    restarts: list[tuple[float, float]]  # per node: (start, back), seconds from the loop's start
    bins: list[tuple[float, float | None, int]]  # (seconds from the loop's start, ratio, cross-node completions)
    cross_node: int


def run(quick: bool, work_dir: Path | None = None) -> RollingResult:
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="kvstore-bench-rolling-"))
    checkpoint = ensure_random_checkpoint(work_dir / "ckpt", "tiny")
    deployment = ClusterDeployment(checkpoint, work_dir / "deploy", router_port=free_port(), host_memory="128MiB",
                                   worker_args=WORKER_ARGS, nodes=3)
    router_log = work_dir / "deploy" / "logs" / "router.log"
    try:
        deployment.start(300)
        node_of = {url: n.name for n, url in zip(deployment.members, deployment.prefill_urls)}
        node_of |= {url: n.name for n, url in zip(deployment.members, deployment.decode_urls)}
        loop = LoadLoop(deployment.router_url, clients=3).start()
        began = time.monotonic()
        time.sleep(6 if quick else 15)
        restarts, away = [], []
        for i in range(3):
            start = time.monotonic()
            away.append(deployment.restart_store(i))
            restarts.append((start - began, time.monotonic() - began))
            time.sleep(0 if quick else 5)
        last_back = time.monotonic()
        time.sleep(15 if quick else 35)
        done = annotate(loop.stop(), router_log)
        ended = time.monotonic()
    finally:
        deployment.stop()
    crossed = cross_node(done, node_of)
    first = began + restarts[0][0]
    baseline = hit_ratio([c for c in crossed if c.ended < first])
    bins = curve(crossed, began, ended, BIN_S)
    during = [ratio for offset, ratio, _ in bins if offset >= restarts[0][0] and ratio is not None]
    return RollingResult(
        completions=len(done), failed=sum(bool(c.error) for c in done), baseline=baseline,
        lowest=min(during, default=None),
        recovered_s=recovery_s(crossed, last_back, ended, 0.9 * baseline, BIN_S) if baseline else None,
        away_s=away, restarts=restarts, bins=bins, cross_node=len(crossed))


def plot(result: RollingResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    xs = [offset + BIN_S / 2 for offset, ratio, _ in result.bins if ratio is not None]
    ys = [100 * ratio for _, ratio, _ in result.bins if ratio is not None]
    ax.plot(xs, ys, "o-", markersize=3, label=f"remote-hit ratio, cross-node completions ({BIN_S:g} s bins)")
    if result.baseline:
        ax.axhline(90 * result.baseline, color="C3", linestyle="--", linewidth=1, label="90% of before (target)")
    for i, (start, back) in enumerate(result.restarts):
        ax.axvspan(start, back, color=("0.75", "0.85")[i % 2], alpha=0.6, label="node n0, n1, n2 restarting" if i == 0 else None)
        ax.text((start + back) / 2, 101, f"n{i} away {back - start:.1f} s", ha="center", va="bottom", fontsize=8)
    counts = ax.twinx()
    counts.bar([offset + BIN_S / 2 for offset, _, _ in result.bins], [n for _, _, n in result.bins], width=BIN_S * 0.8,
               color="C2", alpha=0.3)
    counts.set_ylabel("cross-node completions per bin (bars)")
    ax.set_zorder(counts.get_zorder() + 1)  # the curve over the bars
    ax.patch.set_visible(False)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("% of prompt tokens fetched by decode")
    ax.set_ylim(0, 110)
    ax.set_title(f"Rolling restart of 3 nodes under engine load: {result.completions} completions, {result.failed} failed")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    quick = "--quick" in sys.argv
    result = run(quick)
    path = ROOT / "bench" / "out" / "cluster_rolling_restart.png"
    plot(result, path)
    print(result)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
