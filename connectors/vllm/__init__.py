"""kvstore as vLLM's KV connector: `kv_connector="KVStoreConnector", kv_connector_module_path="connectors.vllm"`.

See docs/vllm.md. Importing this package imports vLLM.
"""
from connectors.vllm.connector import KVStoreConnector

__all__ = ["KVStoreConnector"]
