"""kvstore server: tiered KV-block cache with leases, served over gRPC."""

__version__ = "0.1.0"
