#!/usr/bin/env bash
# Installs what bench/peers.py compares kvstore with: Redis 7 (Debian's redis-server; the bench starts its own
# process, so the packaged service is not wanted) and, into the project's environment (default .venv), the
# `bench` extra: redis-py with hiredis, Mooncake Store (mooncake-transfer-engine) and the CUDA runtime wheel
# its libraries link. Mooncake's wheel needs no torch, so it shares the project's environment; the check at the
# end fails if anything brought a CUDA torch in. On a host without a GPU driver the bench builds a stand-in
# libcuda for Mooncake's processes itself (bench/peers_mooncake.py): nothing to install for that but a C compiler.
# Benchmark dependencies only: `make test` does not need any of this (the harness's tests skip without it).
set -euo pipefail
VENV=$(realpath -m "${1:-.venv}")

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
for lib in libibverbs.so.1 librdmacm.so.1 libnuma.so.1; do  # Mooncake's transfer engine links them even over TCP
    ldconfig -p | grep -q "$lib" || need_apt+=("${lib%%.so.1}1")
done
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
    else
        echo "peers_env: install ${need_apt[*]} (Debian/Ubuntu package names; needs root);" \
             "bench/peers.py reports the peers that need them as absent" >&2
    fi
fi
# The packaged service may have started on 6379; the bench uses its own server on a free port.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl stop redis-server || true
fi

"$VENV/bin/pip" install -q -e '.[bench]'
"$VENV/bin/python" - <<'PY'
import importlib.util
if importlib.util.find_spec("torch"):
    import torch
    assert not torch.version.cuda, f"a CUDA torch ({torch.version.cuda}) reached the environment"
from importlib.metadata import version
print("peers:", ", ".join(f"{p} {version(p)}" for p in ("redis", "hiredis", "mooncake-transfer-engine", "nvidia-cuda-runtime-cu12")))
PY
redis-server --version 2>/dev/null | head -1 || true
