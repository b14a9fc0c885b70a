"""`kvstore serve` as users run it: config sources, the start line, clean SIGTERM, bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from kvclient import KVClient
from tests.serverproc import ServerProc


def test_serve_reads_toml_env_and_flags_and_stops_cleanly(tmp_path, fingerprint):
    toml = tmp_path / "kv.toml"
    toml.write_text('[server]\nhost_memory = "32MiB"\nssd_capacity = "64MiB"\nlease_ttl_s = 7\n')
    srv = ServerProc(tmp_path / "data", flags={"config": toml, "ssd_capacity": "96MiB"}, env={"KVSTORE_HOST_MEMORY": "48MiB"})
    srv.start()
    with KVClient(srv.address, fingerprint) as client:
        tiers = client.stats()["tiers"]
        assert tiers["host"]["capacity_bytes"] == 48 << 20  # env beats the file
        assert tiers["ssd"]["capacity_bytes"] == 96 << 20  # flag beats the file
        keys = client.block_keys(list(range(32)))
        client.put(keys, [b"x" * 4096, b"y" * 4096])
    assert srv.stop(signal.SIGTERM) == 0
    log = srv.log()
    assert f"kvstore serving on {srv.address}: host tier 48 MiB" in log
    assert "kvstore stopped" in log
    # SIGTERM flushed the host tier: both blocks come back after a restart.
    srv.start()
    with KVClient(srv.address, fingerprint) as client:
        assert client.lookup(keys) == 2
    srv.stop()


def test_bad_configuration_is_a_clear_error(tmp_path):
    env = {**os.environ, "KVSTORE_HOST_MEMORY": "plenty"}
    proc = subprocess.run([sys.executable, "-m", "kvstore.cli", "serve", "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "not a size: 'plenty'" in proc.stderr
