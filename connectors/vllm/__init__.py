"""kvstore as vLLM's KV connector: `kv_connector="KVStoreConnector", kv_connector_module_path="connectors.vllm"`.

See docs/vllm.md. The connector class is imported on first use, so the modules that need no
vLLM (layout.py, settings.py) load without it.
"""

__all__ = ["KVStoreConnector"]


def __getattr__(name: str):
    if name == "KVStoreConnector":
        from connectors.vllm.connector import KVStoreConnector

        return KVStoreConnector
    raise AttributeError(name)
