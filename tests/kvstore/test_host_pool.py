"""The host pool's /dev/shm file: committed at start, removed on exit, swept after a crash."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.tiers.host import SHM_DIR, sweep_stale_pools
from tests.serverproc import ServerProc

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")


def pool_files() -> set[str]:
    return {p.name for p in SHM_DIR.glob("kvstore-*")}


def test_pool_of_a_killed_server_is_swept_by_the_next(tmp_path):
    before = pool_files()
    first = ServerProc(tmp_path / "a", flags={"host_memory": "16MiB", "max_block_bytes": "1MiB", "ucx": False}).start()
    mine = pool_files() - before
    assert len(mine) == 1 and mine.pop().startswith(f"kvstore-{first.proc.pid}-")
    first.stop(signal.SIGKILL)
    assert any(name.startswith(f"kvstore-{first.proc.pid}-") for name in pool_files())  # SIGKILL cleans nothing up
    second = ServerProc(tmp_path / "b", flags={"host_memory": "16MiB", "max_block_bytes": "1MiB", "ucx": False}).start()
    try:
        assert not any(name.startswith(f"kvstore-{first.proc.pid}-") for name in pool_files())
    finally:
        second.stop()
    assert not any(name.startswith(f"kvstore-{second.proc.pid}-") for name in pool_files())  # SIGTERM removes its own


def test_sweep_keeps_pools_of_live_processes_and_foreign_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pool = tmp_path / f"kvstore-{dead.stdout.strip()}-0123abcd"
    live_pool = tmp_path / f"kvstore-{os.getpid()}-0123abcd"
    foreign = tmp_path / "kvstore-notapool"
    for p in (dead_pool, live_pool, foreign):
        p.write_bytes(b"x")
    assert sweep_stale_pools(tmp_path) == 1
    assert {p.name for p in Path(tmp_path).iterdir()} == {live_pool.name, foreign.name}
