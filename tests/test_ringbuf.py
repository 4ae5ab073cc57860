"""collectors/ringbuf.py's reading of the BPF ring buffer layout, record by record.

The kernel decides when a record is still reserved (BUSY) or discarded, so those cases cannot
be caused on demand against a real ring buffer: here the layout is laid out by hand in a memfd,
with the same offsets as the kernel's mapping (consumer page, producer page, data). The real
ring buffer is read in tests/test_bcc.py (as root), through both readers.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from collectors.ringbuf import RingReader

SAMPLE = "=QI"  # a 12-byte sample: record stride 8 + 12 -> 24
SIZE = struct.calcsize(SAMPLE)
STRIDE = 24
DATA = 4096
BUSY, DISCARD = 1 << 31, 1 << 30


@pytest.fixture
def ring() -> Iterator[tuple[int, mmap.mmap]]:
    """A memfd laid out as a ring buffer map's pages, and a writable view of all of it."""
    page = mmap.PAGESIZE
    fd = os.memfd_create("clover-test-ring")
    os.ftruncate(fd, 2 * page + 2 * DATA)
    view = mmap.mmap(fd, 2 * page + 2 * DATA)
    yield fd, view
    view.close()
    os.close(fd)


def write(view: mmap.mmap, records: list[tuple[int, int, int]]) -> None:
    """Records (header length word, two sample fields) from data offset 0; producer after."""
    page = mmap.PAGESIZE
    for i, (length, a, b) in enumerate(records):
        struct.pack_into("=II", view, 2 * page + i * STRIDE, length, 0)
        struct.pack_into(SAMPLE, view, 2 * page + i * STRIDE + 8, a, b)
    struct.pack_into("=Q", view, page, len(records) * STRIDE)


def consumer(view: mmap.mmap) -> int:
    return int(struct.unpack_from("=Q", view, 0)[0])


def test_reads_submitted_records_and_advances_the_consumer(ring: tuple[int, mmap.mmap]) -> None:
    fd, view = ring
    write(view, [(SIZE, 1, 10), (SIZE, 2, 20), (SIZE, 3, 30)])
    reader = RingReader(fd, DATA, SAMPLE)
    assert [r[1:] for r in reader.drain()] == [(1, 10), (2, 20), (3, 30)]
    assert consumer(view) == 3 * STRIDE
    assert list(reader.drain()) == []  # nothing new
    reader.close()


def test_stops_at_a_reserved_record_and_skips_discarded_ones(
        ring: tuple[int, mmap.mmap]) -> None:
    fd, view = ring
    write(view, [(SIZE, 1, 10), (SIZE | DISCARD, 2, 20), (SIZE | BUSY, 3, 30), (SIZE, 4, 40)])
    reader = RingReader(fd, DATA, SAMPLE)
    assert [r[1:] for r in reader.drain()] == [(1, 10)]
    assert consumer(view) == 2 * STRIDE  # past the discarded one, not the reserved one
    struct.pack_into("=I", view, 2 * mmap.PAGESIZE + 2 * STRIDE, SIZE)  # now submitted
    assert [r[1:] for r in reader.drain()] == [(3, 30), (4, 40)]
    assert consumer(view) == 4 * STRIDE
    reader.close()


def test_a_record_whose_handling_failed_is_read_again(ring: tuple[int, mmap.mmap]) -> None:
    fd, view = ring
    write(view, [(SIZE, 1, 10), (SIZE, 2, 20)])
    reader = RingReader(fd, DATA, SAMPLE)
    with pytest.raises(RuntimeError, match="handler failed"):
        for record in reader.drain():
            if record[1] == 2:
                raise RuntimeError("handler failed")
    assert consumer(view) == STRIDE
    assert [r[1:] for r in reader.drain()] == [(2, 20)]
    reader.close()


def test_a_record_of_another_size_is_an_error(ring: tuple[int, mmap.mmap]) -> None:
    fd, view = ring
    write(view, [(SIZE + 8, 1, 10)])
    reader = RingReader(fd, DATA, SAMPLE)
    with pytest.raises(RuntimeError, match="expected 12"):
        list(reader.drain())
    assert consumer(view) == 0
    reader.close()
