"""`python -m engines.deploy --nodes 3`: etcd, three kvstore nodes, six workers and a router, each a real process.

The command itself: it starts everything, answers through the router, a prefix computed on one node is
reused on another, and SIGTERM stops every part, leaving no process. Then, in process, the same
deployment (ClusterDeployment) under engine load while each node is restarted in turn (C19): no
completion fails, and the remote-hit ratio (tests/engines/rolling.py) is back within 30 s.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from engines.adapter import loadable_blocks
from engines.checkpoint import load_checkpoint
from engines.deploy_cluster import ClusterDeployment
from engines.protocol import MatchRequest, MatchResponse, post_json
from engines.tokenizer import ByteTokenizer
from tests.engines.procs import REPO_ROOT
from tests.engines.rolling import LoadLoop, annotate, cross_node, curve, hit_ratio, watch_recovery
from tests.engines.test_deploy import alive, read_until_router
from tests.engines.test_router import RouterProc, expected_tokens
from tests.etcdproc import need_etcd
from tests.serverproc import free_port

pytestmark = [pytest.mark.slow, pytest.mark.etcd]

BLOCK = 16  # the workers' default block size
TOKENIZER = ByteTokenizer()
WORKER_ARGS = ["--threads", "1", "--num-pages", "128", "--lease-ttl-s", "2", "--wait-timeout-s", "2"]
PROMPT = "Three nodes, one namespace: a prefix computed on one node is fetched, not recomputed, on another. "


def worker_urls(lines: list[str]) -> dict[str, str]:
    """{"prefill_n0": "http://127.0.0.1:PORT", ...} from the `starting` lines."""
    urls = {}
    for line in lines:
        if m := re.match(r"starting ((?:prefill|decode)_n\d): .* --host (\S+) --port (\d+)", line):
            urls[m[1]] = f"http://{m[2]}:{m[3]}"
    return urls


def test_deploy_three_nodes_answers_reuses_across_nodes_and_stops_cleanly(tmp_path):
    need_etcd()
    checkpoint = tmp_path / "ckpt"
    args = [sys.executable, "-m", "engines.deploy", "--nodes", "3", "--checkpoint", str(checkpoint),
            "--make-random-checkpoint", "tiny", "--port", str(free_port()), "--work-dir", str(tmp_path / "work"),
            "--host-memory", "128MiB", "--worker-args", " ".join(WORKER_ARGS)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    side_router = None
    try:
        url, pids, lines = read_until_router(proc, timeout_s=300)
        parts = {"etcd", "router"} | {f"{role}_n{i}" for role in ("store", "prefill", "decode") for i in range(3)}
        assert set(pids) == parts
        workers = worker_urls(lines)
        model = load_checkpoint(checkpoint)
        front = RouterProc(log_dir=tmp_path, port=int(url.rsplit(":", 1)[1]))  # the deployment's router, to call it

        # At rest, every worker ranks alike and the router picks the first: node n0 computes and publishes the prompt.
        text = PROMPT * 2
        answer = front.complete(prompt=text, max_tokens=8)
        assert answer["choices"][0]["text"] == TOKENIZER.decode(expected_tokens(model, text, 8))
        full = len(TOKENIZER.encode(text)) // BLOCK
        match = post_json(workers["prefill_n1"] + "/match", MatchRequest(TOKENIZER.encode(text)), MatchResponse)
        assert (match.local_blocks, match.remote_blocks) == (0, full)  # n1's node finds it on a peer

        # A router over n1's prefill and n2's decode only: n1 loads the prefix from n0 (a remote hit) and computes
        # the rest; n2's decode fetches the whole prompt through its own node.
        side_router = RouterProc(log_dir=tmp_path, prefill=[workers["prefill_n1"]], decode=[workers["decode_n2"]]).start(60)
        longer = text + "And one more question?"
        answer = side_router.complete(prompt=longer, max_tokens=8)
        assert answer["choices"][0]["text"] == TOKENIZER.decode(expected_tokens(model, longer, 8))
        ids = TOKENIZER.encode(longer)
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == loadable_blocks(full, len(ids), BLOCK) * BLOCK
        line = side_router.routed(answer["id"])
        assert int(line["fetched_tokens"]) == len(ids) // BLOCK * BLOCK
    finally:
        if side_router is not None:
            side_router.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, rest
    order = re.findall(r"stopped (\w+) \(exit (-?\d+)\)", rest)
    assert [name for name, _ in order] == ["router", *(f"{r}_n{i}" for i in (2, 1, 0) for r in ("decode", "prefill")),
                                           "store_n2", "store_n1", "store_n0", "etcd"], rest
    assert all(code == "0" for name, code in order if name != "etcd"), rest  # etcd re-raises SIGTERM on itself
    deadline = time.monotonic() + 5
    while [name for name, pid in pids.items() if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in pids.items() if alive(pid)]


def test_rolling_restart_under_engine_load_fails_nothing_and_hits_recover(tmp_path, tiny_checkpoint):
    """C19. Three clients send completions of fresh prompts through the router while each node's store is restarted
    in turn (SIGTERM; started again with the same name, host id and data dir; waited for until every node sees it
    a member). Nothing fails: workers whose store is away compute instead. Among completions whose prefill and decode
    ran on different nodes, the share of prompt tokens the decode worker fetched is back to >= 90% of what it was
    before within 30 s of the last restart."""
    need_etcd()
    deployment = ClusterDeployment(tiny_checkpoint, tmp_path / "work", router_port=free_port(), host_memory="128MiB",
                                   worker_args=WORKER_ARGS, nodes=3)
    try:
        deployment.start(300)
        node_of = {url: n.name for n, url in zip(deployment.members, deployment.prefill_urls)}
        node_of |= {url: n.name for n, url in zip(deployment.members, deployment.decode_urls)}
        router_log = deployment.work_dir / "logs" / "router.log"
        loop = LoadLoop(deployment.router_url, clients=3).start()
        time.sleep(8)
        first_restart = time.monotonic()
        before = cross_node(annotate(loop.snapshot(), router_log), node_of)
        baseline = hit_ratio(before)
        away = [deployment.restart_store(i) for i in range(3)]
        last_back = time.monotonic()
        recovered = watch_recovery(loop, router_log, node_of, last_back, 0.9 * (baseline or 1), limit_s=34)
        done = annotate(loop.stop(), router_log)
        pids = [child.proc.pid for child in deployment.children]
    finally:
        deployment.stop()

    assert [c.error for c in done if c.error] == []
    assert len(before) >= 10, len(before)
    assert baseline >= 0.9, baseline  # decode fetched nearly every block its prefill published on another node
    shape = curve(cross_node(done, node_of), first_restart - 4, time.monotonic(), 2.0)
    assert recovered is not None and recovered <= 30, (recovered, away, shape)
    assert not [pid for pid in pids if alive(pid)]
