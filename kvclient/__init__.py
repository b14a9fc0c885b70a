"""kvclient: the Python client library for kvstore.

The public names: KVClient, the namespace (Fingerprint, BlockKey, block_keys), the result types
(PutOutcome, LeaseOutcome, BlockState, Tier, LeaseInfo, KeyStatus), what a pin or a transfer reports
(PinnedBlocks, SlotRef, TransferStats, HbmPool) and the errors (kvclient.errors).
"""
from kvclient.errors import BlockNotFoundError, KVStoreError
from kvclient.hbm import HbmPool
from kvclient.pins import PinnedBlocks
from kvclient.transports.base import SlotRef, TransferStats
from kvwire.keys import BlockKey, Fingerprint, block_keys
from kvwire.types import BlockState, KeyStatus, LeaseInfo, LeaseOutcome, PutOutcome, Tier

__all__ = ["BlockKey", "Fingerprint", "block_keys", "KVStoreError", "BlockNotFoundError", "KVClient",
           "BlockState", "KeyStatus", "LeaseInfo", "LeaseOutcome", "PutOutcome", "Tier",
           "PinnedBlocks", "SlotRef", "TransferStats", "HbmPool"]


def __getattr__(name: str):
    # Lazy so that importing kvwire.keys never pulls in gRPC channels.
    if name == "KVClient":
        from kvclient.client import KVClient

        return KVClient
    raise AttributeError(name)
