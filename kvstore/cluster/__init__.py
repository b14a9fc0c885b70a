"""Cluster mode: etcd membership, peer calls, the sharded directory and the remote-peers tier (docs/cluster.md)."""
