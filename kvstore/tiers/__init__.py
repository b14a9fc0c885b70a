"""Storage tiers: host (shared-memory pool), ssd (LMDB)."""
