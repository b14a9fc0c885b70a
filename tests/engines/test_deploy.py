"""`python -m engines.deploy` on a fresh directory: makes a checkpoint, starts four processes, answers, stops them all."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from engines.checkpoint import load_checkpoint
from engines.generate import generate_greedy
from engines.tokenizer import ByteTokenizer
from tests.engines.procs import REPO_ROOT
from tests.engines.tiny import make_cache
from tests.serverproc import free_port

PROMPT = "A small deployment on one machine"


def read_until_router(proc: subprocess.Popen, timeout_s: float = 120) -> tuple[str, dict[str, int], list[str]]:
    """The router URL, each part's pid, and every line printed so far."""
    lines, pids, deadline = [], {}, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"deploy exited early ({proc.poll()}):\n" + "".join(lines)
        lines.append(line)
        if ready := re.match(r"(\w+) ready pid=(\d+)", line):
            pids[ready[1]] = int(ready[2])
        if line.startswith("router: "):
            return line.split()[1], pids, lines
    raise TimeoutError("".join(lines))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_deploy_starts_answers_and_shuts_down_cleanly(tmp_path):
    checkpoint = tmp_path / "ckpt"
    args = [sys.executable, "-m", "engines.deploy", "--checkpoint", str(checkpoint), "--make-random-checkpoint", "tiny",
            "--port", str(free_port()), "--work-dir", str(tmp_path / "work"), "--host-memory", "128MiB",
            "--worker-args", "--threads 1 --num-pages 128"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    try:
        url, pids, _ = read_until_router(proc)
        assert set(pids) == {"store", "prefill", "decode", "router"}

        body = json.dumps({"prompt": PROMPT, "max_tokens": 12}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        model = load_checkpoint(checkpoint)
        expected = generate_greedy(model, make_cache(model), ByteTokenizer().encode(PROMPT), 12,
                                   eos_id=model.config.eos_token_id)
        assert answer["choices"][0]["text"] == ByteTokenizer().decode(expected)

        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    for name in ("router", "decode", "prefill", "store"):
        assert f"stopped {name} (exit 0)" in rest, rest
    assert not [name for name, pid in pids.items() if alive(pid)]
