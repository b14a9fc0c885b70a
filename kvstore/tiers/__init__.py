"""Storage tiers behind one protocol (base.py): host (shared-memory pool), ssd (LMDB)."""
