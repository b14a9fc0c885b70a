"""Connectors: kvstore behind engines that this project does not ship (vLLM, LMCache).

Each subpackage adapts one engine's own extension point to kvclient's public API and
imports that engine, so it runs only in an environment that has it (`make vllm-env`,
`make lmcache-env`). Nothing in kvwire, kvclient, kvstore or engines imports this package.
"""
