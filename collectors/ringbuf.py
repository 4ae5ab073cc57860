"""Drain a BPF ring buffer from Python in batches: one ``struct.iter_unpack`` over everything
committed since the last drain, instead of a call per event.

libbpf's consumer, which BCC's ``open_ring_buffer`` uses, calls back into Python once per event
(a ctypes trampoline, BCC's wrapper, a copy, an unpack): at 100k events/s that was about a fifth
of the flow collector's CPU. The ring buffer's memory layout is kernel ABI (include/uapi/linux/
bpf.h, kernel/bpf/ringbuf.c), and libbpf reads it the same way:

* the map's fd mapped at offset 0: one page holding the consumer position (ours to advance);
* at offset one page: a page holding the producer position, then the data area, mapped twice in
  a row so that a record crossing the end reads as contiguous bytes;
* each record: an 8-byte header (``u32 len`` with a BUSY bit while reserved and not yet
  submitted, and a DISCARD bit; ``u32 pg_off``), the sample, padding to 8 bytes.

Python has no memory barriers, so this relies on x86-64's ordering of loads (a committed header
is read before the sample behind it; see :func:`supported`); elsewhere callers use libbpf's
consumer.
"""

from __future__ import annotations

import mmap
import platform
import struct
from collections.abc import Iterator
from typing import Any

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
_U64 = struct.Struct("=Q")


def supported() -> bool:
    """Plain loads are ordered like acquire loads only on x86 (TSO)."""
    return platform.machine() in ("x86_64", "AMD64", "i686", "i386")


class RingReader:
    """Reads fixed-size records of ``sample_format`` (a struct format starting with ``=``) from
    the ring buffer map ``map_fd`` whose data area is ``data_size`` bytes."""

    def __init__(self, map_fd: int, data_size: int, sample_format: str) -> None:
        if not sample_format.startswith("="):
            raise ValueError(f"sample format {sample_format!r} must start with '='")
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._page = page
        self._mask = data_size - 1
        self._sample_size = struct.calcsize(sample_format)
        self._stride = (_HEADER + self._sample_size + 7) & ~7
        padding = self._stride - _HEADER - self._sample_size
        # The header's length word, then the sample's fields.
        self._record = struct.Struct(f"=I4x{sample_format[1:]}{padding}x")

    def drain(self) -> Iterator[tuple[Any, ...]]:
        """Yield each submitted record as a tuple: the header's length word, then the sample's
        fields. The consumer position advances past every record the caller took, when the
        iteration ends or is abandoned (a record whose handling raised is read again)."""
        consumer = _U64.unpack_from(self._consumer)[0]
        producer = _U64.unpack_from(self._producer)[0]
        available = producer - consumer
        if available <= 0:
            return
        if available % self._stride:
            raise RuntimeError(f"ring buffer holds {available} bytes, not a whole number of "
                               f"{self._stride}-byte records: a record of another size")
        start = self._page + (consumer & self._mask)
        # A copy: the kernel may reuse the space as soon as the consumer position moves.
        chunk = self._producer[start:start + available]
        size, taken = self._sample_size, 0
        try:
            for record in self._record.iter_unpack(chunk):
                length = record[0]
                if length != size:
                    if length & _BUSY:
                        break  # reserved, not yet submitted: it and everything after wait
                    if length & _DISCARD and length & ~_DISCARD == size:
                        taken += 1
                        continue
                    raise RuntimeError(f"ring buffer record of {length & ~_DISCARD} bytes, "
                                       f"expected {size}")
                yield record
                taken += 1
        finally:
            if taken:
                _U64.pack_into(self._consumer, 0, consumer + taken * self._stride)

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
