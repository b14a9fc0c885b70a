# Every target works from a fresh clone: it creates .venv, installs, generates stubs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= .kvstore-data
# UCX over loopback TCP on machines without RDMA; override for real fabrics.
export UCX_TLS ?= tcp,self,sm
export UCX_NET_DEVICES ?= lo
export UCX_WARN_UNUSED_ENV_VARS ?= n

.PHONY: serve test soak install install-test proto etcd bench bench-peers peers-env clean vllm-env lmcache-env test-vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The install compiles the control path's C (csrc/kvnative, csrc/kvstore_native; setup.py): a changed
# source rebuilds it. A failed compile still installs, running pure Python, and says so here.
NATIVE_SOURCES := setup.py $(wildcard csrc/kvnative/*.[ch] csrc/kvstore_native/*.c)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(NATIVE_SOURCES)
	$(BIN)/pip install -q grpcio-tools
	$(BIN)/pip install -q -e .
	@$(BIN)/python -c "from kvwire.native import status; print('native control path (kvwire._native):', status)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	# CPU build of torch first, so nothing below can pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,engines,ucx,cluster]'
	touch $@

install: $(VENV)/.installed proto
# The cluster tests start their own etcd servers: the binary must be on PATH.
install-test: $(VENV)/.installed-test proto etcd

etcd:
	bash tools/ensure_etcd.sh

proto: $(BIN)/python
	$(BIN)/python tools/gen_proto.py

serve: install
	$(BIN)/kvstore serve --data-dir $(DATA_DIR) --insecure-no-auth

# The connector tests (tests/connectors) run real vLLM and LMCache from their own environments.
test: install-test vllm-env lmcache-env
	$(BIN)/python -m pytest -q -ra tests

# The fault and fuzz campaigns at ten times the size `make test` runs them (docs/soak.md);
# KVSTORE_SOAK_SEED=<seed> replays a failure.
SOAK_SCALE ?= 10
soak: install-test
	KVSTORE_SOAK_SCALE=$(SOAK_SCALE) $(BIN)/python -m pytest -q -ra -m soak tests/soak

# vLLM (CPU build) in its own environment, .venv-vllm: the connector's tests run vLLM from there
# (tests/connectors, marked `vllm`, skipped without it). About 1.5 min and 3.5 GB.
vllm-env: .venv-vllm/.installed
.venv-vllm/.installed: tools/vllm_env.sh pyproject.toml
	PY=$(PY) bash tools/vllm_env.sh .venv-vllm
	touch $@

# LMCache in its own environment too (it pins numpy<=2.2.6 and protobuf<7), with an installed copy
# of the project whose stubs match its protobuf: rebuilt when connectors/ or the contract changes.
lmcache-env: .venv-lmcache/.installed
.venv-lmcache/.installed: tools/lmcache_env.sh pyproject.toml $(shell find connectors kvclient kvwire -name '*.py' -not -path 'kvwire/v1/*' 2>/dev/null)
	PY=$(PY) bash tools/lmcache_env.sh .venv-lmcache
	touch $@

test-vllm: install-test vllm-env lmcache-env
	$(BIN)/python -m pytest -q -ra -m "vllm or lmcache" tests/connectors

bench: install-test
	$(BIN)/python bench/throughput.py

# kvstore beside Redis and Mooncake Store on this host (bench/peers.py; docs/benchmarks.md). The peers are
# benchmark dependencies only: Debian packages (root) and the `bench` extra, installed by tools/peers_env.sh.
PEERS_ARGS ?=
peers-env: $(VENV)/.installed-peers
$(VENV)/.installed-peers: $(VENV)/.installed-test tools/peers_env.sh pyproject.toml
	bash tools/peers_env.sh $(VENV)
	touch $@

bench-peers: peers-env proto
	$(BIN)/python bench/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) .venv-vllm .venv-lmcache kvwire/v1 $(DATA_DIR)
