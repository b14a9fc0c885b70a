"""kvclient: the Python client library for kvstore."""
from kvclient.errors import BlockNotFoundError, KVStoreError
from kvclient.keys import BlockKey, Fingerprint, block_keys

__all__ = ["BlockKey", "Fingerprint", "block_keys", "KVStoreError", "BlockNotFoundError", "KVClient"]


def __getattr__(name: str):
    # Lazy so that importing kvclient.keys never pulls in gRPC channels.
    if name == "KVClient":
        from kvclient.client import KVClient

        return KVClient
    raise AttributeError(name)
