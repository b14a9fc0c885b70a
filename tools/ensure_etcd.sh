#!/usr/bin/env bash
# Makes sure an `etcd` server binary is on PATH for the cluster tests (they start their own on loopback).
# Installs Debian's etcd-server when it is missing; anywhere else it says what to do instead of failing,
# so `make test` still runs (the cluster tests then skip, naming the reason).
set -euo pipefail

if command -v etcd >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_etcd: no 'etcd' on PATH and cannot install it here (needs root and apt-get);" \
         "install etcd >= 3.4 (Debian/Ubuntu: apt-get install etcd-server) or the cluster tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# --no-install-recommends: the tests start their own etcd; the packaged service is not wanted.
apt-get install -y -q --no-install-recommends etcd-server >/dev/null
# The package may start a system-wide etcd on the default ports; the tests use random ports, but stop it
# anyway so a CI machine runs only what its tests start.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl stop etcd || true
fi
command -v etcd >/dev/null 2>&1 || { echo "ensure_etcd: etcd-server installed but no 'etcd' on PATH" >&2; exit 1; }
etcd --version | head -1
