"""Bundled inference engines: a paged-KV Llama in plain torch, and (later) the bridge to kvstore.

config.py        ModelConfig from HF config.json
tokenizer.py     ByteTokenizer, bundled, no downloads
checkpoint.py    load / save / randomly create HF-format checkpoints
paged_cache.py   PagedKVCache: pages, block tables, stored-block gather/scatter
layers.py        RMSNorm, RoPE, SwiGLU
attention.py     SeqChunk, AttentionMetadata, paged_attention
model.py         LlamaForCausalLM over a PagedKVCache
generate.py      one-process reference generation

Nothing here imports kvclient except adapter.py, so the model runs without a store.
"""
