"""kvstore as an LMCache remote storage plugin (`remote_url: plugin://kvstore`). See docs/vllm.md.

Importing this package imports LMCache.
"""
from connectors.lmcache.remote import KVStoreRemoteConnector

__all__ = ["KVStoreRemoteConnector"]
