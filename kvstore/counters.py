"""The store's event counters: one closed set of names, so a counter cannot be misspelled or go unexported.

Owns what the store counts: every key of `Store.counters` is an `Event`. The values are
the counter names the server has always used (they appear in Stats' `counters` map, in
`kvstore-admin stats` and in tests), and a StrEnum hashes and compares as its value, so
`counters[Event.PUTS]` and `counters["puts"]` are one entry. It refuses metric names
and labels: kvstore/metrics.py maps each Event to a Prometheus series, from one table.

Labelled events (payload bytes by transport and direction, refused requests by status)
are members too, one per label value, reached through `transport_bytes()` and
`request_error()` rather than built from strings. Hot loops should name a member
directly (`Event.GRPC_BYTES_OUT`) and add a batch's count once rather than per block.
"""
from __future__ import annotations

import enum


class Transport(enum.StrEnum):
    """Ways payload bytes pass through the server process (shm moves them without it)."""

    GRPC = "grpc"
    UCX = "ucx"


class Direction(enum.StrEnum):
    IN = "in"  # into the store (a put)
    OUT = "out"  # out of the store (a get)


class Event(enum.StrEnum):
    # Reads and writes, whatever the transport. Blocks, except the *_BYTES counts.
    PUTS = "puts"  # blocks committed
    GETS = "gets"  # blocks served (Get and Pin)
    HITS_HOST = "hits_host"  # served, held by the host tier
    HITS_SSD = "hits_ssd"  # served, held by the ssd tier only
    HITS_HBM = "hits_hbm"  # pinned with an HBM copy too (a same-host GPU client may copy it device to device)
    MISSES = "misses"  # asked for by Get or Pin, not present
    BYTES_IN = "bytes_in"  # payload bytes committed
    BYTES_OUT = "bytes_out"  # payload bytes served
    LOOKUP_BLOCKS_HIT = "lookup_blocks_hit"
    LOOKUP_BLOCKS_MISS = "lookup_blocks_miss"
    CHECKSUM_FAILURES = "checksum_failures"  # at commit, on an ssd read, or found at start

    # Write leases and read pins (a pin is not a lease: docs/glossary.md).
    LEASE_GRANTS = "lease_grants"
    LEASE_WAITS = "lease_waits"  # Wait calls
    LEASE_WAITS_ABANDONED = "lease_waits_abandoned"  # the caller left while waiting
    LEASE_EXPIRIES = "lease_expiries"
    PIN_EXPIRIES = "pin_expiries"
    LEASE_REVOCATIONS = "lease_revocations"  # by an admin
    PIN_REVOCATIONS = "pin_revocations"
    SLOTS_QUARANTINED = "slots_quarantined"  # slots of leases that ended without Commit or Release

    # Placement: copies moving between tiers, and blocks leaving the store.
    DEMOTIONS = "demotions"  # host copy dropped after writing it to ssd
    PROMOTIONS = "promotions"  # ssd copy read back into the host tier
    HOST_EVICTIONS = "host_evictions"  # host copy dropped, the ssd copy already there
    SSD_EVICTIONS = "ssd_evictions"  # ssd copy dropped
    EVICTIONS = "evictions"  # block gone from the store for room
    ADMIN_EVICTIONS = "admin_evictions"  # block gone by an admin's evict
    ADMIN_DELETES = "admin_deletes"
    SECURE_DELETES = "secure_deletes"  # secure delete runs, not blocks

    # The HBM tier: a clean copy of hot host blocks (kvstore/hbm_placement.py).
    HBM_PROMOTIONS = "hbm_promotions"  # host blocks copied into the HBM tier and verified there
    HBM_EVICTIONS = "hbm_evictions"  # HBM copies dropped (room, an operator); the host copy stays
    HBM_VERIFY_FAILURES = "hbm_verify_failures"  # copies that did not match their checksum where they landed
    HBM_DEVICE_ERRORS = "hbm_device_errors"  # the HBM tier's GPU failed and the tier was dropped

    # Cluster mode: membership (kvstore/cluster/membership.py) and cluster-wide deletes (tombstones.py).
    CLUSTER_JOINS = "cluster_joins"  # registrations, first and after a fence (each a new incarnation)
    CLUSTER_FENCES = "cluster_fences"  # self-fences: keepalives unacknowledged too long, lease lost, key taken
    CLUSTER_VIEW_CHANGES = "cluster_view_changes"  # membership changes seen on the watch
    CLUSTER_KEEPALIVE_FAILURES = "cluster_keepalive_failures"  # keepalives that got no answer in their deadline
    TOMBSTONES_ISSUED = "tombstones_issued"
    TOMBSTONES_APPLIED = "tombstones_applied"
    CLUSTER_SSD_WIPES = "cluster_ssd_wipes"  # ssd tier dropped because the tombstones it missed were trimmed

    # Cluster mode: copies between nodes (kvstore/cluster/replicator.py: replicas, repair, spill, handoff). Blocks, except bytes.
    CLUSTER_COPIES_TAKEN = "cluster_copies_taken"  # blocks this node copied in because a peer asked it to
    CLUSTER_COPY_BYTES_TAKEN = "cluster_copy_bytes_taken"
    CLUSTER_COPIES_SENT = "cluster_copies_sent"  # blocks peers took from this node on its request
    CLUSTER_COPY_BYTES_SENT = "cluster_copy_bytes_sent"
    CLUSTER_COPY_FAILURES = "cluster_copy_failures"  # copy requests to a peer that failed (an error, a fence, a deadline)
    CLUSTER_REPLICA_PUSHES_DROPPED = "cluster_replica_pushes_dropped"  # committed blocks not pushed: the queue was full
    CLUSTER_REPAIR_KEYS = "cluster_repair_keys"  # keys this home had copied again after a holder left (below R)
    CLUSTER_SPILLED = "cluster_spilled"  # sole copies moved to a peer with room instead of evicted
    CLUSTER_HANDED_OFF = "cluster_handed_off"  # sole copies moved to peers by drain --handoff
    CLUSTER_SOLE_COPIES_EVICTED = "cluster_sole_copies_evicted"  # blocks no other node held, evicted for room (lost)

    # Cluster mode: the remote tier (reads here of peers' blocks; kvstore/cluster/remote_tier.py). Blocks, except bytes.
    REMOTE_LOCATE_FOUND = "remote_locate_found"  # keys missing here that a live peer holds
    REMOTE_LOCATE_ABSENT = "remote_locate_absent"  # keys missing here and at every peer the directory names
    REMOTE_LOCATE_ERRORS = "remote_locate_errors"  # Locate calls to a home that failed (its keys count as absent)
    REMOTE_FETCH_BLOCKS = "remote_fetch_blocks"  # blocks fetched from peers, checked and stored here
    REMOTE_FETCH_BYTES = "remote_fetch_bytes"
    REMOTE_FETCH_UCX_BLOCKS = "remote_fetch_ucx_blocks"  # of remote_fetch_blocks, those that came over UCX (else gRPC)
    REMOTE_FETCHES_COMPLETE = "remote_fetches_complete"  # fetches that got every block asked for
    REMOTE_FETCHES_SHORT = "remote_fetches_short"  # fetches that ended early (a miss, the deadline, a failure)
    REMOTE_FETCH_FAILURES = "remote_fetch_failures"  # fetch calls broken by the peer or the network
    REMOTE_FETCH_NOT_FOUND = "remote_fetch_not_found"  # a holder the directory named had not got the block
    REMOTE_CHECKSUM_FAILURES = "remote_checksum_failures"  # blocks from peers that failed their checksum (not used)
    REMOTE_FETCH_BUSY = "remote_fetch_busy"  # runs a holder refused past its peer_max_inflight (the reader moved on)

    # Cluster mode: peer calls (peers.py, peer_service.py) and this node's directory shard (directory.py, announcer.py).
    PEER_SERVED_BLOCKS = "peer_served_blocks"  # blocks this node sent to peers
    PEER_SERVED_BYTES = "peer_served_bytes"
    PEER_SERVED_NOT_FOUND = "peer_served_not_found"  # fetches that named a block this node has not got
    PEER_REJECTED_FENCED = "peer_rejected_fenced"  # peer calls refused while this node was fenced
    PEER_REJECTED_STALE_VIEW = "peer_rejected_stale_view"  # calls naming another incarnation of this node
    PEER_REJECTED_ZOMBIE = "peer_rejected_zombie"  # calls from a sender incarnation that is not live
    PEER_REJECTED_BUSY = "peer_rejected_busy"  # peer transfers refused past peer_max_inflight (RESOURCE_EXHAUSTED)
    PEER_BREAKER_OPENS = "peer_breaker_opens"  # a peer's circuit breaker opened (one timeout or 3 errors)
    PEER_CALLS_SHORT_CIRCUITED = "peer_calls_short_circuited"  # calls not made: the peer's breaker was open
    CLUSTER_CLAIMS_GRANTED = "cluster_claims_granted"  # keys granted here that are computed here (cluster-wide, or the home was unreachable)
    CLUSTER_CLAIMS_PENDING = "cluster_claims_pending"  # keys answered PENDING: another node claimed them first
    CLUSTER_CLAIMS_LOCAL = "cluster_claims_local"  # of the granted, those whose home could not answer (granted here: availability)
    DIRECTORY_LOCATES = "directory_locates"  # Locate calls this node answered as a home
    DIRECTORY_ANNOUNCES = "directory_announces"  # announce batches applied here
    DIRECTORY_RESYNCS = "directory_resyncs"  # holder resyncs applied here
    DIRECTORY_RESYNCS_REQUESTED = "directory_resyncs_requested"  # batches refused for a gap: the holder resyncs
    DIRECTORY_REPAIRS = "directory_repairs"  # entries dropped here because their holder answered not-found
    DIRECTORY_REPAIRS_SENT = "directory_repairs_sent"  # such repairs this node sent to homes
    DIRECTORY_BATCHES_SENT = "directory_batches_sent"  # announce batches this node's homes acknowledged
    DIRECTORY_RESYNCS_SENT = "directory_resyncs_sent"  # full resyncs this node sent (a join, a new or restarted home, a gap)
    DIRECTORY_ANNOUNCE_FAILURES = "directory_announce_failures"  # announce batches that failed (kept and retried)
    DIRECTORY_COMMIT_WAITS_EXPIRED = "directory_commit_waits_expired"  # commits answered before their homes acknowledged
    DIRECTORY_REHOMED = "directory_rehomed"  # keys announced to a new home after a view change
    DIRECTORY_HOT_PUSHES = "directory_hot_pushes"  # pushes of hot keys to more nodes this home asked for (hot.py)
    DIRECTORY_HOT_PUSH_FAILURES = "directory_hot_push_failures"  # such pushes that failed

    # The UCX data plane.
    UCX_PINS_STAGED_OFF_LOOP = "ucx_pins_staged_off_loop"  # pins that had to read ssd on a worker thread
    UCX_HBM_SENDS = "ucx_hbm_sends"  # blocks a get sent from their HBM copy (GPU memory to a client's GPU memory)

    # Payload bytes by transport and direction: transport_bytes().
    GRPC_BYTES_IN = "grpc_bytes_in"
    GRPC_BYTES_OUT = "grpc_bytes_out"
    UCX_BYTES_IN = "ucx_bytes_in"
    UCX_BYTES_OUT = "ucx_bytes_out"

    # Requests refused by the store, by the status of the domain error (kvwire/errors.py): request_error().
    ERRORS_INVALID_ARGUMENT = "errors_invalid_argument"
    ERRORS_FAILED_PRECONDITION = "errors_failed_precondition"
    ERRORS_NOT_FOUND = "errors_not_found"
    ERRORS_RESOURCE_EXHAUSTED = "errors_resource_exhausted"
    ERRORS_DATA_LOSS = "errors_data_loss"
    ERRORS_UNAUTHENTICATED = "errors_unauthenticated"
    ERRORS_PERMISSION_DENIED = "errors_permission_denied"
    ERRORS_UNAVAILABLE = "errors_unavailable"
    ERRORS_ABORTED = "errors_aborted"
    ERRORS_DEADLINE_EXCEEDED = "errors_deadline_exceeded"
    ERRORS_INTERNAL = "errors_internal"
    ERRORS_UNKNOWN = "errors_unknown"  # a status outside the table: still counted, never dropped


TRANSPORT_BYTES: dict[tuple[Transport, Direction], Event] = {
    (Transport.GRPC, Direction.IN): Event.GRPC_BYTES_IN,
    (Transport.GRPC, Direction.OUT): Event.GRPC_BYTES_OUT,
    (Transport.UCX, Direction.IN): Event.UCX_BYTES_IN,
    (Transport.UCX, Direction.OUT): Event.UCX_BYTES_OUT,
}

# status (gRPC's vocabulary, as kvwire.errors carries it) -> its event
REQUEST_ERRORS: dict[str, Event] = {
    event.value.removeprefix("errors_").upper(): event for event in Event if event.value.startswith("errors_")
}


def transport_bytes(transport: Transport | str, direction: Direction | str) -> Event:
    """The event counting payload bytes one transport moved one way; ValueError for an unknown name."""
    return TRANSPORT_BYTES[Transport(transport), Direction(direction)]


def request_error(status: str) -> Event:
    """The event counting requests refused with this status ("NOT_FOUND", ...)."""
    return REQUEST_ERRORS.get(status, Event.ERRORS_UNKNOWN)
