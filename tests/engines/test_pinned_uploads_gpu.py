"""engines/pinned_uploads.py on a GPU: what lands is what was given, also when a buffer's turn comes
round again while the stream is still busy (the ring must wait for the GPU, never overwrite a pending copy
or a table a queued kernel has yet to read)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.cuda_events import current_stream_ptr, new_event
from engines.pinned_uploads import MIN_WORDS, PinnedDownloads, TableRing
from tests.engines.tiny import gpu_only

pytestmark = [pytest.mark.gpu, gpu_only]


def test_downloads_hand_out_a_buffer_only_once_it_is_given_back():
    downloads, stream = PinnedDownloads(), torch.cuda.Stream()
    words = torch.arange(1000, dtype=torch.int64, device="cuda")
    doubled, shifted = words * 2, words[:10] + 5
    stream.wait_stream(torch.cuda.current_stream())  # the inputs exist before the copies read them
    first = downloads.start(words, stream)
    second = downloads.start(doubled, stream)  # first not given back: another buffer
    stream.synchronize()
    assert first.data_ptr() != second.data_ptr()
    assert np.array_equal(first.numpy(), np.arange(1000)) and np.array_equal(second.numpy(), 2 * np.arange(1000))
    downloads.done(first)
    third = downloads.start(shifted, stream)
    stream.synchronize()
    assert third.data_ptr() == first.data_ptr() and np.array_equal(third.numpy(), np.arange(10) + 5)


def test_a_table_slot_is_reused_only_after_its_readers_ran():
    """A busy slot is never handed out; one given back is handed out again only once the stream passed the point it was
    given back at (a kernel queued behind a long sleep still reads it meanwhile); a bigger ask gets a bigger slot."""
    ring, stream = TableRing(torch.device("cuda"), depth=2), torch.cuda.Stream()
    first = ring.take(100)
    second = ring.take(100)
    assert first is not second and first.capacity >= 100
    first.words[:100] = np.arange(100) * 3
    first.upload(100, stream.cuda_stream)
    reader = torch.empty(100, dtype=torch.int64, device="cuda")
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        reader.copy_(first.device_words[:100])  # the "kernel" reading the table, long after it is given back
    ring.give_back(first, stream.cuda_stream)
    ring.give_back(second, stream.cuda_stream)
    assert not first.released.query()  # the sleep is still running
    again = ring.take(100)  # a full ring: a slot given back, waited for
    assert again.released is not None and again.released.query()
    again.words[:100] = -1  # the earlier copy and its reader are done: overwriting is safe now
    again.upload(100, stream.cuda_stream)
    stream.synchronize()
    assert np.array_equal(reader.cpu().numpy(), np.arange(100) * 3)
    assert np.array_equal(again.device_words[:100].cpu().numpy(), np.full(100, -1))
    held = ring.take(10)  # the other one (again is busy)
    big = ring.take(4 * MIN_WORDS)  # the ring is full and busy: a new slot, big enough
    assert len({id(again), id(held), id(big)}) == 3 and big.capacity >= 4 * MIN_WORDS
    assert big.ptr(5) == big.device_ptr + 40


def test_stream_events_order_streams_and_time_them():
    """new_event: a stream made to wait on an event does not run ahead of the record; query and elapsed_ms read it."""
    device = torch.device("cuda")
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    source = torch.zeros(1 << 20, device=device)
    target = torch.empty_like(source)
    begin, end = new_event(device, timing=True), new_event(device, timing=True)
    with torch.cuda.stream(producer):
        begin.record(producer.cuda_stream)
        torch.cuda._sleep(50_000_000)
        source.fill_(7)
        end.record(producer.cuda_stream)
    assert not end.query()
    end.wait_on(consumer.cuda_stream)
    with torch.cuda.stream(consumer):
        target.copy_(source)
        assert current_stream_ptr(device) == consumer.cuda_stream
    consumer.synchronize()
    assert end.query() and bool((target == 7).all())
    assert end.elapsed_ms(end) == 0.0 and begin.elapsed_ms(end) > 0.0
