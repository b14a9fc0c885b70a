"""Bundled inference engines: a paged-KV Llama in plain torch, its kvstore adapter, and P/D serving.

The model
config.py          ModelConfig from HF config.json
presets.py         named random shapes (tiny, small, 1b) for offline use
tokenizer.py       ByteTokenizer, bundled, no downloads
checkpoint.py      load / save / randomly create HF-format checkpoints
paged_cache.py     PagedKVCache: pages, block tables, stored-block gather/scatter
layers.py          RMSNorm, RoPE, SwiGLU
attention.py       SeqChunk, AttentionMetadata, paged_attention, LayerAttention
cuda_graphs.py     piecewise CUDA graphs around eager attention
cuda_kernels.py    the csrc/ kernels, compiled at first use (NVRTC)
model.py           LlamaForCausalLM over a PagedKVCache
generate.py        one-process reference generation

The bridge to kvstore (nothing in the model above imports kvclient)
fingerprint.py     the Fingerprint of a loaded checkpoint
adapter.py         StoreAdapter: block keys, put/get of a sequence's blocks, prefix loads
layerwise.py       layer-by-layer DMA plans from the store's pool into pages
block_checksum.py  XXH3 of blocks where they landed in GPU memory

Serving (docs/engines.md)
worker_engine.py   what prefill and decode workers share
prefill.py         prefill worker: compute once, publish under write leases
decode.py          decode worker: land the prompt's blocks, stream tokens
protocol.py        router <-> worker JSON shapes
worker_common.py   the workers' routes, /health, load and totals
http_server.py     HTTP for the workers and the router: threaded server, JSON/NDJSON/SSE, stops on SIGTERM
completions.py     the OpenAI /v1/completions subset
routing_policy.py  cache locality and load, scored
router.py          the HTTP front end: choice, retries, streaming
deploy.py          one command for a local store + prefill + decode + router
deploy_cluster.py  the same with --nodes N: etcd, N cluster nodes, a prefill and a decode worker per node
orphan_guard.py    runs a deployed part so the kernel stops it when deploy dies (no fork in deploy)
"""
