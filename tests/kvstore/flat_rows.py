"""The block index's flat rows (kvstore._native.FlatIndex) held to its dict: what every in-process test checks at its end
(tests/kvstore/conftest.py), and test_pin_table's random runs check as they go."""
from __future__ import annotations

from kvstore.index import BlockIndex, row_fields

U64_NONE = (1 << 64) - 1


def _representable(fields: tuple) -> bool:
    """Whether the flat table can hold a row exactly (else it keeps it opaque, and a walk through it goes to Python)."""
    _, meta, fp, size, checksum, host_offset, host_size, hbm_offset = fields
    ints = (size, checksum, host_offset, host_size, hbm_offset)
    return (type(fp) is bytes and len(fp) == 16 and all(type(v) is int for v in ints) and type(meta.pins) is int
            and 0 <= size < U64_NONE and 0 <= checksum < U64_NONE and all(-1 <= v < U64_NONE for v in ints[2:])
            and (host_offset == -1) == (host_size == -1))


def flat_row_mismatches(index: BlockIndex) -> list[str]:
    """What differs between the index's dict and its flat rows: a block without its row or with another's, a row whose
    fields are not the block's, rows for blocks no longer indexed (the count)."""
    flat = index.flat
    if flat is None:
        return []
    named = [meta for meta in index.blocks.values() if len(meta.skey) == 24]  # a walk names tenant tag + 16-byte key
    problems = [] if len(flat) == len(named) else [f"{len(flat)} rows for {len(named)} blocks"]
    for meta in named:
        fields, row = row_fields(meta), flat.row(meta.skey)
        if row is None or row[0] is not meta:
            problems.append(f"{meta.skey.hex()}: row {'missing' if row is None else 'of another block'}")
        elif row[1] == "opaque":
            if _representable(fields):
                problems.append(f"{meta.skey.hex()}: opaque, though its fields fit")
        elif row[1:] != fields[2:]:
            problems.append(f"{meta.skey.hex()}: row {row[1:]} against the block's {fields[2:]}")
    return problems
