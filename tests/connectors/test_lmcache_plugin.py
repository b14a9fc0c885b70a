"""The kvstore LMCache plugin inside LMCache's own storage manager, against a real kvstore server.

LMCache runs in its own environment (`make lmcache-env`: it pins numpy and protobuf below the
project's), from that environment's installed copy of the project; the test skips, saying so,
when the environment is missing or its copy of connectors/ differs from this tree.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.serverproc import ServerProc

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("KVSTORE_LMCACHE_PYTHON") or ROOT / ".venv-lmcache" / "bin" / "python")
CHILD = Path(__file__).with_name("lmcache_child.py")


def lmcache_missing() -> str:
    if not PYTHON.exists():
        return f"no LMCache environment at {PYTHON} (build it with `make lmcache-env`)"
    probe = subprocess.run([str(PYTHON), "-c", "import connectors; print(connectors.__file__)"], capture_output=True, text=True,
                           cwd="/", env={"PATH": os.environ.get("PATH", "")})
    if probe.returncode != 0:
        return f"{PYTHON} has no installed copy of the project"
    site = Path(probe.stdout.strip()).parent.parent
    stale = [rel for package in ("connectors", "kvclient", "kvwire") for path in (ROOT / package).rglob("*.py")
             if "v1" not in (rel := path.relative_to(ROOT)).parts[1:2]
             and (not (site / rel).exists() or (site / rel).read_bytes() != path.read_bytes())]
    return f"the LMCache environment's copy of the project is stale ({[str(p) for p in stale[:3]]}): re-run `make lmcache-env`" if stale else ""


pytestmark = [pytest.mark.lmcache, pytest.mark.skipif(bool(lmcache_missing()), reason=lmcache_missing() or "LMCache present")]


def test_storage_manager_stores_drops_and_retrieves_bit_exact(tmp_path):
    srv = ServerProc(tmp_path / "store", flags={"host_memory": "128MiB", "ssd_capacity": "256MiB"}).start()
    try:
        report_path = tmp_path / "report.json"
        run = subprocess.run([str(PYTHON), str(CHILD), srv.address, str(report_path)], capture_output=True, text=True,
                             cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")}, timeout=300)
        assert run.returncode == 0, run.stderr[-6000:]
        report = json.loads(report_path.read_text())
    finally:
        srv.stop()
    assert report["local_after_drop"] == [False, False]  # LMCache's local copies are gone...
    assert report["found"] == [True, True] and report["bit_exact"] == [True, True]  # ...yet both chunks came back whole
    assert report["stats"]["blocks_saved"] == 2 and report["stats"]["blocks_loaded"] == 2  # from kvstore
    assert report["stats"]["store_errors"] == 0
