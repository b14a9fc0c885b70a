"""Configuration precedence: defaults < TOML < KVSTORE_* env < flags."""
from __future__ import annotations

import pytest

from kvstore.config import ServerConfig, load_config, parse_size


def test_parse_size_units():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("1.5k") == 1500
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_precedence_toml_env_flags(tmp_path):
    toml = tmp_path / "kv.toml"
    toml.write_text('[server]\nhost_memory = "64MiB"\nlease_ttl_s = 3\ndata_dir = "/from/toml"\nlisten = "127.0.0.1:1"\n')
    env = {"KVSTORE_HOST_MEMORY": "128MiB", "KVSTORE_LEASE_TTL_S": "4", "KVSTORE_SHM": "false"}
    cfg = load_config(str(toml), env=env, flags={"host_memory": "256MiB", "listen": None})
    assert cfg.host_memory == 256 << 20  # flag wins
    assert cfg.lease_ttl_s == 4.0  # env beats TOML
    assert cfg.data_dir == "/from/toml"  # TOML beats default
    assert cfg.listen == "127.0.0.1:1"  # an unset flag does not override
    assert cfg.shm is False


def test_defaults_and_errors(tmp_path):
    assert load_config(env={}) == ServerConfig()
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus = 1\n")
    with pytest.raises(ValueError, match="unknown setting 'bogus'"):
        load_config(str(bad), env={})
    with pytest.raises(ValueError, match="watermark"):
        load_config(env={}, flags={"low_watermark": "0.95"})


def test_busy_poll_is_bounded():
    assert load_config(env={"KVSTORE_LOCAL_CONTROL_BUSY_POLL_US": "20000"}).local_control_busy_poll_us == 20000
    for bad in ("-1", "1000001"):
        with pytest.raises(ValueError, match="local_control_busy_poll_us"):
            load_config(env={}, flags={"local_control_busy_poll_us": bad})
