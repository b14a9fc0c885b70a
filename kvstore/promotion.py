"""Promotion policy: which host blocks are hot enough for the HBM tier, and which HBM copies may make room.

Owns the decision only, as eviction.py does for demotion: a read history (the last few reads of each
block that was read lately, and how deep in a prompt it sat) and the rules over it. It never changes
the block table or touches a tier; hbm_placement.py carries the choices out on the background worker.

Two signals, both cheap to keep:

* recent hits: a block read `min_hits` times within `window_s` is hot. One read is what every prompt
  costs; a second within the window says the prefix is shared (a system prompt, a few-shot header,
  a conversation's history), which is what a device copy pays for.
* prefix position: a read names a chain of keys, block 0 first. Every prompt sharing a prefix reads
  its early blocks, so they are the most reused, and a TTFT-critical load starts with them: hot
  blocks are promoted shallow first, and an HBM copy gives way only to a shallower or hotter one.

Request threads only append a read event (one deque append per Pin, whatever its length: a prefix
Pin of 512 keys must stay cheap); the background worker folds events into the history. Reads of
blocks already in the HBM tier are not folded (a hot prefix names them on every load, and that
Python loop holds the GIL against the server's request threads): a resident copy counts as hot
while the block was read within the window (the index stamps every read, `last_access`), at
the position it was promoted from.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from kvstore.index import BlockMeta
from kvwire.types import Tier

# Unfolded read events kept at most: a stalled worker must not grow memory without bound.
MAX_PENDING_READS = 1 << 16
# Blocks the history remembers at most; the least recently read are forgotten first.
MAX_TRACKED_BLOCKS = 1 << 20


@dataclass(eq=False, slots=True)
class Heat:
    """What the history knows of one block."""

    meta: BlockMeta
    reads: deque[float]  # monotonic times of its last min_hits reads
    position: int  # the shallowest position it was read at (0: a chain's first block)

    @property
    def last_read(self) -> float:
        return self.reads[-1]


class ReadHistory:
    """Recent reads of blocks. `note` may be called from any thread; everything else from one (the worker)."""

    def __init__(self, keep_reads: int, max_blocks: int = MAX_TRACKED_BLOCKS) -> None:
        self.keep_reads = max(1, keep_reads)
        self.max_blocks = max_blocks
        self._events: deque[tuple[float, Sequence[BlockMeta]]] = deque(maxlen=MAX_PENDING_READS)
        self._heat: OrderedDict[bytes, Heat] = OrderedDict()  # skey -> heat, least recently read first

    def note(self, metas: Sequence[BlockMeta], now: float | None = None) -> None:
        """One read of metas, in chain order. O(1): folded later by fold()."""
        if metas:
            self._events.append((time.monotonic() if now is None else now, metas))

    def fold(self, skip_tier: Tier | None = None) -> list[Heat]:
        """Fold the read events noted so far into the history, leaving out blocks with a copy in skip_tier;
        the blocks they read, each once.

        Only these can have become hot since the last fold, so a promotion pass ranks them alone,
        not the whole history (hundreds of thousands of blocks on a busy server)."""
        touched: dict[bytes, Heat] = {}
        while self._events:
            try:
                at, metas = self._events.popleft()
            except IndexError:
                break
            for position, meta in enumerate(metas):
                if skip_tier is None or skip_tier not in meta.copies:
                    touched[meta.skey] = self._record(meta, at, position)
        while len(self._heat) > self.max_blocks:
            self._heat.popitem(last=False)
        return list(touched.values())

    def _record(self, meta: BlockMeta, at: float, position: int) -> Heat:
        heat = self._heat.get(meta.skey)
        if heat is None or heat.meta is not meta:  # a block deleted and put again is a new block
            heat = self._heat[meta.skey] = Heat(meta, deque([at], maxlen=self.keep_reads), position)
            self._heat.move_to_end(meta.skey)
            return heat
        heat.reads.append(at)
        heat.position = min(heat.position, position)
        self._heat.move_to_end(meta.skey)
        return heat

    def prune(self, now: float, window_s: float, keep_tier: Tier | None = None) -> None:
        """Forget blocks not read within window_s, and deleted ones; those with a copy in keep_tier stay
        (their reads are no longer folded, and the position they were promoted from still counts)."""
        for skey in [s for s, h in self._heat.items()
                     if h.meta.deleted or (now - h.last_read > window_s and (keep_tier is None or keep_tier not in h.meta.copies))]:
            del self._heat[skey]

    def get(self, meta: BlockMeta) -> Heat | None:
        heat = self._heat.get(meta.skey)
        return heat if heat is not None and heat.meta is meta else None

    def __iter__(self) -> Iterator[Heat]:
        return iter(list(self._heat.values()))

    def __len__(self) -> int:
        return len(self._heat)


@dataclass(frozen=True)
class PromotionPolicy:
    """A block is hot once read min_hits times within window_s; hot blocks go shallow first."""

    min_hits: int = 2
    window_s: float = 60.0
    batch_bytes: int = 64 << 20  # payload chosen per hold of the store lock: the worker lets go of it between batches
    batch_blocks: int = 64  # and blocks: making room costs a little per block, under the lock

    def history(self) -> ReadHistory:
        return ReadHistory(self.min_hits)

    def is_hot(self, heat: Heat | None, now: float) -> bool:
        return heat is not None and len(heat.reads) >= self.min_hits and now - heat.reads[0] <= self.window_s

    def ranked(self, heats: Iterable[Heat], now: float) -> list[Heat]:
        """The hot blocks, shallowest first, and among equals the most recently read first."""
        return sorted((h for h in heats if self.is_hot(h, now)), key=lambda h: (h.position, -h.last_read))

    def may_displace(self, incoming: Heat, resident: BlockMeta, resident_position: int | None, now: float) -> bool:
        """Whether an HBM copy may be dropped to make room for incoming: its block was not read within the
        window, or sits deeper in its prompts than incoming does (resident_position: where it was promoted
        from; None when forgotten, and then it stays while read). Equals never displace each other, so two
        hot sets larger than the tier do not take turns copying themselves in."""
        if not self.read_lately(resident, now):
            return True
        return resident_position is not None and resident_position > incoming.position

    def read_lately(self, resident: BlockMeta, now: float) -> bool:
        """Whether a resident copy's block was read within the window (the index stamps every read)."""
        return now - resident.last_access <= self.window_s

    def candidates(self, heats: Iterable[Heat], now: float) -> list[Heat]:
        """The hot ones of heats (blocks with a host copy and no HBM copy yet), ranked, one batch
        (batch_blocks, batch_bytes of payload)."""
        chosen, total = [], 0
        for heat in self.ranked(heats, now):
            if chosen and (total + heat.meta.size > self.batch_bytes or len(chosen) == self.batch_blocks):
                break
            chosen.append(heat)
            total += heat.meta.size
        return chosen

