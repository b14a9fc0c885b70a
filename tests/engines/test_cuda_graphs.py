"""Piecewise CUDA graphs: the bucket plan (here) and graphs against eager (test_gpu.py, on a GPU)."""
import pytest

from engines.cuda_graphs import PiecewiseGraphs, bucket_sizes


@pytest.mark.parametrize("max_tokens", [1, 64, 300, 2048])
def test_buckets_cover_every_size_with_bounded_padding(max_tokens):
    sizes = bucket_sizes(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_tokens
    for n in range(1, max_tokens + 1):
        bucket = next(size for size in sizes if size >= n)
        assert bucket < 2 * n if n <= 256 else bucket - n < 128, (n, bucket)


def test_graphs_need_a_cuda_model(tiny_model):
    with pytest.raises(ValueError, match="CUDA"):
        PiecewiseGraphs(tiny_model)
    with pytest.raises(ValueError, match="CUDA"):
        tiny_model.use_cuda_graphs(64)
    assert tiny_model.use_cuda_graphs(0)._graphs is None
