"""GPU tensors through the UCX transport: put from and get into CUDA memory, byte-exact.

Needs a CUDA GPU, torch with CUDA, and a CUDA-aware UCX (ucxx-cu12/cu13 wheels are).
The server's UCX_TLS adds cuda_copy so the pair can move device memory; the
client hands UCX the tensors themselves, so nothing in kvstore stages them
through host memory (UCX may still pipeline through its own bounce buffers on
transports without GPUDirect, e.g. TCP).

    UCX_TLS=tcp,self,sm,cuda_copy python -m pytest -q -m gpu tests/kvclient/test_transport_gpu.py
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import InvalidRequestError
from kvwire.types import PutOutcome
from tests.kvclient.transport_util import HAVE_UCX, tokens
from tests.serverproc import ServerProc

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.ucx,
    pytest.mark.skipif(not HAVE_UCX, reason="ucxx not importable"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

GPU_UCX_TLS = os.environ.get("KVSTORE_TEST_GPU_UCX_TLS", "tcp,self,sm,cuda_copy")


@pytest.fixture(autouse=True)
def client_ucx_moves_gpu_memory():
    """This process's UCX read UCX_TLS when it loaded: without a CUDA transport there, the client refuses GPU buffers
    (tests/kvclient/test_transport_ucx.py), so these tests need the run's environment to name one."""
    from kvwire.ucxenv import Worker

    if not Worker.get().cuda_support:
        pytest.skip("this process's UCX_TLS names no CUDA transport: run with UCX_TLS=tcp,self,sm,cuda_copy")


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    srv = ServerProc(tmp_path_factory.mktemp("gpu") / "data", flags={"host_memory": "1GiB", "ssd_capacity": "2GiB", "ucx_all_interfaces": True}, env={"UCX_TLS": GPU_UCX_TLS})
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("block_bytes", [64 << 10, 4 << 20])
def test_torch_cuda_round_trip_over_ucx(gpu_server, fingerprint, block_bytes):
    with KVClient(gpu_server.address, fingerprint, tenant=f"gpu-{block_bytes}", transport="ucx") as client:
        keys = client.block_keys(tokens(16))
        blocks = [torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, device="cuda") for _ in range(16)]
        assert client.put(keys, blocks) == [PutOutcome.STORED] * 16
        outs = [torch.empty(block_bytes // 2, dtype=torch.float16, device="cuda") for _ in range(16)]
        got = client.get(keys, out=outs)
        assert all(g.is_cuda for g in got)
        assert all(torch.equal(o.view(torch.uint8), b) for o, b in zip(outs, blocks))
        # The same blocks read back to the host are the same bytes.
        host = client.get(keys[:1])[0]
        assert np.array_equal(host, blocks[0].cpu().numpy())
        s = client.last_transfer
        print(f"\n{block_bytes >> 10} KiB x16 GPU get: transfer {s.transfer_s * 1e3:.2f} ms, validate {s.validate_s * 1e3:.2f} ms")


def test_cupy_round_trip_over_ucx(gpu_server, fingerprint):
    cupy = pytest.importorskip("cupy")
    with KVClient(gpu_server.address, fingerprint, tenant="gpu-cupy", transport="ucx") as client:
        keys = client.block_keys(tokens(4, start=5000))
        blocks = [cupy.arange(1 << 18, dtype=cupy.float32) * i for i in range(4)]
        client.put(keys, blocks)
        outs = [cupy.empty_like(b) for b in blocks]
        client.get(keys, out=outs)
        assert all(bool((o == b).all()) for o, b in zip(outs, blocks))


def test_gpu_tensor_refused_on_host_only_transport(gpu_server, fingerprint):
    with KVClient(gpu_server.address, fingerprint, tenant="gpu-shm", transport="shm") as client:
        with pytest.raises(InvalidRequestError, match="GPU buffer"):
            client.put(client.block_keys(tokens(1)), [torch.zeros(16, device="cuda")])
