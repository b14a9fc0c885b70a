"""Checks every in-process test of the server gets for free."""
from __future__ import annotations

import weakref

import pytest

from kvstore.index import BlockIndex
from tests.kvstore.flat_rows import flat_row_mismatches


@pytest.fixture(autouse=True)
def flat_rows_follow_the_index(monkeypatch):
    """Every block index a test builds in this process ends the test with its flat rows (the compiled prefix walk's)
    equal to its dict: a copy attached or detached, a block added, replaced or removed anywhere the test reached."""
    made: weakref.WeakSet[BlockIndex] = weakref.WeakSet()
    init = BlockIndex.__init__

    def tracked(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        made.add(self)

    monkeypatch.setattr(BlockIndex, "__init__", tracked)
    yield
    for index in list(made):
        problems = flat_row_mismatches(index)
        assert not problems, f"the flat rows left the index: {problems[:5]}"
