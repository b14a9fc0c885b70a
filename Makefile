# Every target works from a fresh clone: it creates .venv, installs, generates stubs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= .kvstore-data
# UCX over loopback TCP on machines without RDMA; override for real fabrics.
export UCX_TLS ?= tcp,self,sm
export UCX_NET_DEVICES ?= lo
export UCX_WARN_UNUSED_ENV_VARS ?= n

.PHONY: serve test soak install install-test proto etcd bench clean

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

test: install-test
	$(BIN)/python -m pytest -q -ra tests

# The fault and fuzz campaigns at ten times the size `make test` runs them (docs/soak.md);
# KVSTORE_SOAK_SEED=<seed> replays a failure.
SOAK_SCALE ?= 10
soak: install-test
	KVSTORE_SOAK_SCALE=$(SOAK_SCALE) $(BIN)/python -m pytest -q -ra -m soak tests/soak

bench: install-test
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) kvwire/v1 $(DATA_DIR)
