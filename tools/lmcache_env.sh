#!/usr/bin/env bash
# Build the virtualenv the LMCache storage plugin is tested in (default .venv-lmcache). LMCache pins
# numpy<=2.2.6 and protobuf<7 and its grpcio-observability pins grpcio 1.78, while the project's
# environment has newer ones, so it gets its own, held to LMCache's versions by a constraints file.
# The CPU build of torch goes first so that nothing pulls a CUDA build; LMCache's storage layer,
# the part the plugin plugs into, runs on the CPU.
#
# The project is installed as a copy (not editable) and built without isolation, with this
# environment's grpcio-tools: its gRPC stubs are then generated for protobuf 6, while the work
# tree's kvwire/v1 may hold stubs for protobuf 7 (which protobuf 6 refuses to load). Re-run after
# changing the plugin (`make lmcache-env` does when connectors/ changes).
set -euo pipefail
PY=${PY:-python3}
VENV=$(realpath -m "${1:-.venv-lmcache}")
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LMCACHE_VERSION=${LMCACHE_VERSION:-0.5.6}
GRPC_VERSION=${GRPC_VERSION:-1.78.0}
start=$(date +%s)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
constraints="$VENV/constraints.txt"
printf 'protobuf<7\nnumpy<=2.2.6\ngrpcio==%s\ngrpcio-tools==%s\ngrpcio-health-checking==%s\ngrpcio-reflection==%s\n' \
  "$GRPC_VERSION" "$GRPC_VERSION" "$GRPC_VERSION" "$GRPC_VERSION" > "$constraints"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q -c "$constraints" "lmcache==$LMCACHE_VERSION" grpcio-tools pytest pytest-timeout "setuptools>=77" wheel
"$VENV/bin/pip" install -q -c "$constraints" --no-build-isolation --force-reinstall .
(cd / && "$VENV/bin/python" - <<'PY'
import google.protobuf, torch, lmcache  # noqa: F401
import connectors.lmcache, kvclient.client  # noqa: F401  (the installed copy, stubs included)
assert not torch.version.cuda, f"a CUDA torch ({torch.version.cuda}) reached the LMCache environment"
print(f"lmcache on torch {torch.__version__}, protobuf {google.protobuf.__version__}")
PY
)
echo "LMCache environment $VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
